"""QAT of a fixed architecture: space from the architecture, pruned groups stay zero, KD, save/load."""

import pytest
import torch
from accelerate import Accelerator
from transformers import BertForSequenceClassification, get_constant_schedule

from search.qat import dampening, distillation_loss, qat_optimizer, qat_step
from search.models import save_checkpoint
from search.quantized import load_quantized, quantize, save_quantized, space_for
from search.tasks import TaskKind
from data_fixtures import tiny_tokenizer
from supernet import Architecture, MixedEmbedding, SearchSpace, SiteKind, sites, to_supernet
from supernet.files import umask_mode

SPACE = SearchSpace(w_bits=[0, 2, 4, 8], groups=4, a_bits=[8], embedding_bits=[4, 8], embedding_groups=4)


def _arch(cfg, seed=0):
    torch.manual_seed(seed)
    model = to_supernet(BertForSequenceClassification(cfg), SPACE)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, site in sites(model):
            if site.wq.alpha is not None:
                site.wq.alpha.copy_(torch.randn(site.wq.alpha.shape, generator=g))
    return Architecture.from_supernet(model)


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 99, (4, 8), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1, 0])}


def test_space_for_uses_exactly_the_architecture_bits(tiny_cfg):
    arch = _arch(tiny_cfg)
    space = space_for(arch, SPACE)
    assert space.w_bits == sorted({b for _, s in arch if s.kind is SiteKind.ENCODER for b in s.bits})
    assert space.head_bits == [32] and space.groups == 4
    torch.manual_seed(1)
    model = quantize(BertForSequenceClassification(tiny_cfg), arch, SPACE)
    assert Architecture.from_supernet(model) == arch


def test_qat_keeps_pruned_groups_exactly_zero(tiny_cfg):
    arch = _arch(tiny_cfg)
    assert arch.pruned_groups() > 0
    torch.manual_seed(1)
    teacher = BertForSequenceClassification(tiny_cfg).eval()
    model = quantize(BertForSequenceClassification(tiny_cfg), arch, SPACE)
    model.load_state_dict(teacher.state_dict(), strict=False)
    opt = qat_optimizer(model, 1e-2, 1e-3, 0.01)
    steps0 = [s.wq.step.detach().clone() for _, s in sites(model)]
    step = qat_step(model, teacher, opt, get_constant_schedule(opt), Accelerator(cpu=True), TaskKind.CLASSIFICATION,
                    kd_weight=0.5, kd_temperature=2.0, hidden_weight=0.1, dampen_weight=0.1, max_grad_norm=1.0)
    for i in range(3):
        logs = step(_batch(), i)
    assert {"loss/task", "loss/kd", "loss/hidden", "loss/dampen"} <= set(logs)
    assert any(not torch.equal(a, s.wq.step) for a, (_, s) in zip(steps0, sites(model)))  # LSQ steps train
    for name, site in sites(model):
        w, bias = site.quantized_weight()
        for g, b in enumerate(arch.site(name).bits):
            if b == 0:
                rows = slice(g * site.grouping.size, (g + 1) * site.grouping.size)
                block = w[:, rows] if isinstance(site, MixedEmbedding) else w[rows]
                assert torch.equal(block, torch.zeros_like(block))
                if bias is not None:
                    assert torch.equal(bias[rows], torch.zeros_like(bias[rows]))


def test_distillation_is_zero_for_identical_logits_and_positive_otherwise():
    out = type("O", (), {"logits": torch.randn(3, 4)})()
    other = type("O", (), {"logits": torch.randn(3, 4)})()
    assert float(distillation_loss(out, out, TaskKind.CLASSIFICATION, 2.0)) == pytest.approx(0, abs=1e-6)
    assert float(distillation_loss(out, other, TaskKind.CLASSIFICATION, 2.0)) > 0
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    tok = type("O", (), {"logits": torch.randn(1, 3, 5)})()
    assert float(distillation_loss(tok, tok, TaskKind.TOKEN_CLASSIFICATION, 1.0, mask)) == pytest.approx(0, abs=1e-6)


def test_save_and_load_quantized_predicts_identically(tmp_path, tiny_cfg):
    arch = _arch(tiny_cfg, seed=2)
    torch.manual_seed(3)
    model = quantize(BertForSequenceClassification(tiny_cfg), arch, SPACE).eval()
    batch = {k: v for k, v in _batch().items() if k != "labels"}
    with torch.no_grad():
        ref = model(**batch).logits
    save_quantized(model, arch, space_for(arch, SPACE), tiny_tokenizer(tmp_path / "tok"), "sst2", tmp_path / "quantized")
    loaded, arch2, task = load_quantized(tmp_path / "quantized")
    assert arch2 == arch and task == "sst2"
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, ref)
    assert dampening(loaded).item() > 0
    # safetensors alone writes 0600: the model would be hidden from the user's group
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "quantized").iterdir()}
    assert modes == dict.fromkeys(modes, umask_mode()) and "model.safetensors" in modes
    save_checkpoint(BertForSequenceClassification(tiny_cfg), tiny_tokenizer(tmp_path / "tok"), tmp_path / "ckpt", "sst2")
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "ckpt").iterdir()}
    assert modes == dict.fromkeys(modes, umask_mode()) and "model.safetensors" in modes


def test_load_quantized_rejects_a_wrong_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a quantized model folder"):
        load_quantized(tmp_path)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "architecture.json").write_text('{"format":'), "JSONDecodeError|not valid JSON"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]), "SafetensorError"),
    (lambda d: (d / "bert_mpq.json").write_text("{}"), "KeyError"),  # which task it is for
])
def test_a_damaged_quantized_folder_is_the_users_to_rewrite(tmp_path, tiny_cfg, damage, message):
    # eval and export read this folder: a truncated file in it is not a bert-mpq bug, and says which folder
    from search.errors import UserError

    arch = _arch(tiny_cfg, seed=2)
    model = quantize(BertForSequenceClassification(tiny_cfg), arch, SPACE)
    folder = tmp_path / "quantized"
    save_quantized(model, arch, space_for(arch, SPACE), tiny_tokenizer(tmp_path / "tok"), "sst2", folder)
    damage(folder)
    with pytest.raises(UserError, match=f"{folder} cannot be read as a quantized model \\(.*({message}).*run the qat stage again"):
        load_quantized(folder)


def _fixed_uniform(cfg, bits: int = 2, space: SearchSpace = SPACE):
    from search.budget import uniform

    torch.manual_seed(0)
    model = to_supernet(BertForSequenceClassification(cfg), space)
    arch = uniform(Architecture.from_supernet(model), bits)
    model = quantize(BertForSequenceClassification(cfg), arch, space)
    return model, arch


@pytest.mark.parametrize("grid", ["symmetric", "midrise"])
def test_oscillating_weights_freeze_and_stay_on_their_code(tiny_cfg, grid):
    import dataclasses

    from search.freezing import OscillationFreezer
    from supernet.mixed import fixed_codes
    from supernet.quantizers import QuantMode, dequantize, half

    mode = QuantMode(grid)
    model, _ = _fixed_uniform(tiny_cfg, space=dataclasses.replace(SPACE, w_grid=mode))
    name, site = next((n, s) for n, s in sites(model) if s.kind is SiteKind.ENCODER)
    steps, codes, _ = fixed_codes(site)
    s, h = float(steps[0, 0]), half(mode)
    base = site.to_groups(site.weight.detach()).clone()

    def move(t: int) -> None:  # weight 0 of group 0 flips between codes 1 and 0 every step; weight 1 only climbs
        g = base.clone()
        g[0, 0] = (0.6 + h if t % 2 == 0 else 0.4 + h) * s
        g[0, 1] = -1.6 * s + 0.5 * s * t + h * s
        with torch.no_grad():
            site.weight.copy_(site.from_groups(g))

    move(0)
    freezer = OscillationFreezer(model, threshold=0.3, momentum=0.5)
    for t in range(1, 7):
        move(t)
        logs = freezer()
    st = freezer.state[name]
    assert st["frozen"][0, 0] and not st["frozen"][0, 1]
    assert 0 < logs["freeze/frozen"] < 0.01 and logs["freeze/oscillating"] > 0
    with torch.no_grad():  # an optimiser step pushes the frozen weight away; the freezer puts it back on its code
        g = site.to_groups(site.weight.detach()).clone()
        g[0, 0] = 5 * s
        site.weight.copy_(site.from_groups(g))
        freezer()
        _, codes, _ = fixed_codes(site)
    assert codes[0, 0] == st["frozen_codes"][0, 0]
    assert torch.allclose(site.to_groups(site.weight)[0, 0], dequantize(st["frozen_codes"][0, 0].float(), steps[0, 0], mode))
    assert codes[0, 0] in (0, 1) and st["frozen_codes"][0, 0] in (0, 1)
    again = OscillationFreezer(model, threshold=0.3, momentum=0.5)
    again.load_state_dict(freezer.state_dict())
    assert torch.equal(again.state[name]["frozen"], st["frozen"])


def test_qat_with_freezing_trains_and_logs(tiny_cfg):
    from search.freezing import OscillationFreezer

    model, arch = _fixed_uniform(tiny_cfg)
    opt = qat_optimizer(model, 5e-2, 1e-3, 0.0)  # a large lr makes codes flip
    freezer = OscillationFreezer(model, threshold=0.05, momentum=0.5)
    step = qat_step(model, None, opt, get_constant_schedule(opt), Accelerator(cpu=True), TaskKind.CLASSIFICATION,
                    kd_weight=0.0, kd_temperature=2.0, hidden_weight=0.0, dampen_weight=0.0, max_grad_norm=1.0,
                    freezer=freezer)
    for i in range(6):
        logs = step(_batch(), i)
    assert logs["freeze/frozen"] > 0 and Architecture.from_supernet(model) == arch
