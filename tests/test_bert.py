"""Conversion of Hugging Face BERT models: the float candidate reproduces them; bad models raise."""
import dataclasses

import pytest
import torch
from torch import nn
from transformers import (
    AutoModel,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    GPT2Config,
    GPT2Model,
)

from supernet import (Architecture, MixedEmbedding, MixedLinear, SearchSpace, SiteKind, expected_bitops, expected_size, sites,
                      to_supernet)

FP_SPACE = SearchSpace(w_bits=[0, 2, 4, 32], groups=4, a_bits=[8, 32], embedding_bits=[0, 4, 32],
                       embedding_groups=4, head_bits=[8, 32])


def _all_float(arch: Architecture) -> Architecture:
    return Architecture(tuple((n, dataclasses.replace(s, bits=(32,) * len(s.bits), a_bits=32 if s.a_bits else None))
                              for n, s in arch), arch.other_params)


def _outputs(model, batch):
    out = model(**batch)
    if isinstance(model, BertModel):
        return [out.last_hidden_state, out.pooler_output]
    if isinstance(model, BertForQuestionAnswering):
        return [out.start_logits, out.end_logits]
    return [out.logits]


@pytest.mark.parametrize("cls", [BertModel, BertForSequenceClassification, BertForTokenClassification, BertForQuestionAnswering])
def test_float_candidate_reproduces_hf_model(cls, tiny_cfg, batch):
    torch.manual_seed(0)
    model = cls(tiny_cfg).eval()
    with torch.no_grad():
        ref = _outputs(model, batch)
    to_supernet(model, FP_SPACE)
    _all_float(Architecture.from_supernet(model)).apply(model)
    with torch.no_grad():
        got = _outputs(model, batch)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_sites_cover_every_layer_embeddings_and_head(tiny_cfg):
    model = to_supernet(BertForSequenceClassification(tiny_cfg), FP_SPACE)
    names = dict(sites(model))
    assert sum(isinstance(m, MixedLinear) and m.kind is SiteKind.ENCODER for m in names.values()) == 6 * 2
    assert sum(isinstance(m, MixedEmbedding) for m in names.values()) == 3
    assert {"bert.pooler.dense", "classifier"} <= set(names)
    assert "bert.encoder.layer.1.attention.self.query" in names
    assert names["classifier"].grouping.n_groups == 2  # 2 labels: one group per row


def test_default_space_keeps_head_fp_and_quantizes_embeddings_at_8_bits(tiny_cfg):
    model = to_supernet(BertForTokenClassification(tiny_cfg), SearchSpace(groups=4))
    names = dict(sites(model))
    assert "classifier" not in names and "bert.pooler.dense" not in names
    assert names["bert.embeddings.word_embeddings"].wq.cands.bits == (8,)
    assert isinstance(model.classifier, nn.Linear) and not isinstance(model.classifier, MixedLinear)


def test_unsupported_model_raises_naming_it():
    with pytest.raises(TypeError, match="GPT2Model"):
        to_supernet(GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50)), SearchSpace())


def test_unmappable_module_raises_naming_it(tiny_cfg):
    model = BertForSequenceClassification(tiny_cfg)
    model.bert.encoder.layer[1].intermediate.dense = nn.Sequential(nn.Linear(32, 40))
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.1\.intermediate\.dense.*Sequential"):
        to_supernet(model, SearchSpace(groups=4))


def test_converting_twice_raises(tiny_cfg):
    model = to_supernet(BertModel(tiny_cfg), SearchSpace(groups=4))
    with pytest.raises(ValueError, match="already"):
        to_supernet(model, SearchSpace(groups=4))


def test_group_count_that_does_not_divide_raises(tiny_cfg):
    with pytest.raises(ValueError, match="do not divide"):
        to_supernet(BertModel(tiny_cfg), SearchSpace(groups=3))


@pytest.mark.parametrize("a_bits, min_cos", [(32, 0.995), (8, 0.9)])
def test_real_minilm_converts(assets, a_bits, min_cos):
    model = AutoModel.from_pretrained(assets / "models" / "all-MiniLM-L6-v2").eval()
    ids = torch.randint(1000, 2000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
    to_supernet(model, SearchSpace(w_bits=[0, 2, 4, 8], groups=128, a_bits=[a_bits]))
    assert len(list(sites(model))) == 6 * 6 + 3
    arch = Architecture.from_supernet(model)
    eight = Architecture(tuple((n, dataclasses.replace(s, bits=(8,) * len(s.bits))) for n, s in arch), arch.other_params)
    eight.apply(model)
    with torch.no_grad():
        got = model(input_ids=ids).last_hidden_state
    # 8-bit weights barely move the output; per-tensor 8-bit activations before any training lose more
    # (BERT's activation outliers, Bondarenko et al. 2021), which QAT's learned steps recover
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert cos > min_cos
    assert eight.avg_bits("encoder") == 8.0
    # MiniLM-L6: 6 layers x (4 x 384^2 + 2 x 384 x 1536) encoder weights
    assert eight.size("encoder").weights == 6 * (4 * 384 * 384 + 2 * 384 * 1536)
    assert expected_size(model, "encoder").bytes.item() == pytest.approx(eight.size_bytes("encoder"))


def test_conversion_makes_every_new_tensor_on_the_model_s_device(tiny_cfg):
    # the logits, choices and activation steps were made on the CPU: a CUDA model converted in place would
    # mix devices in its first forward (the meta device stands in for a GPU here)
    model = BertForSequenceClassification(tiny_cfg).to("meta")
    to_supernet(model, SearchSpace(groups=4, a_bits=[4, 8], a_mode="asymmetric", head_bits=[8, 32]))
    where = {name: t.device.type for name, t in [*model.named_parameters(), *model.named_buffers()]}
    assert set(where.values()) == {"meta"}, {n: d for n, d in where.items() if d != "meta"}


def test_a_model_that_cannot_be_converted_is_left_as_it_was(tiny_cfg):
    # 40 FFN rows do not split into 16 groups: the attention sites before it were already replaced, and the
    # model could then be converted neither way
    model = BertForSequenceClassification(tiny_cfg)
    with pytest.raises(ValueError, match="intermediate.dense: 16 groups do not divide"):
        to_supernet(model, SearchSpace(groups=16))
    assert not list(sites(model))
    to_supernet(model, SearchSpace(groups=4))
    assert len(list(sites(model))) > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_cost_model_is_exact_inside_autocast(tiny_cfg, dtype):
    # its matmuls ran in half precision there: fp16 sizes and bit-operations overflowed to inf, bf16 ones lost 0.3%
    model = to_supernet(BertForSequenceClassification(tiny_cfg), SearchSpace(groups=4, a_bits=[4, 8]))
    plain = expected_size(model, "encoder").bytes, expected_bitops(model)
    with torch.autocast("cpu", dtype=dtype):
        inside = expected_size(model, "encoder").bytes, expected_bitops(model)
    assert [t.dtype for t in inside] == [t.dtype for t in plain] and all(map(torch.equal, inside, plain))
