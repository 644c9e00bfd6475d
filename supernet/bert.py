"""The table of wrapped sites of Hugging Face BERT models, and `to_supernet`, which swaps them in place.

Sites (Q-BERT, arXiv:1909.05840; AQ-BERT, arXiv:2112.14938): in every encoder layer the query, key and
value projections, the attention output, FFN in and FFN out; the word, position and token-type
embeddings; optionally the pooler and the task head. Anything that does not match this table raises
an error that names the module.
"""
from __future__ import annotations

import logging
from typing import Callable

from torch import nn
from transformers import (
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)

from .groups import make_grouping
from .mixed import ActQuantizer, MixedEmbedding, MixedLinear, sites
from .quantizers import CandidateSet
from .space import SearchSpace, SiteKind

log = logging.getLogger(__name__)

SUPPORTED = (BertModel, BertForSequenceClassification, BertForTokenClassification, BertForQuestionAnswering)
# path inside an encoder layer -> does it split by attention heads; Q/K/V read one input and share its quantizer
SHARED_INPUT = ("attention.self.query", "attention.self.key", "attention.self.value")
ENCODER_SITES = {
    "attention.self.query": True,
    "attention.self.key": True,
    "attention.self.value": True,
    "attention.output.dense": False,
    "intermediate.dense": False,
    "output.dense": False,
}
EMBEDDING_SITES = ("word_embeddings", "position_embeddings", "token_type_embeddings")
HEAD_SITES = {BertForSequenceClassification: "classifier", BertForTokenClassification: "classifier",
              BertForQuestionAnswering: "qa_outputs"}


def _get(root: nn.Module, path: str, root_name: str, expected: type) -> nn.Module:
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            raise ValueError(f"cannot map {root_name}.{path}: module not found (expected {expected.__name__}); not a standard BERT layout")
        module = getattr(module, part)
    if isinstance(module, (MixedLinear, MixedEmbedding)):
        raise ValueError(f"{root_name}.{path} is already a mixed-precision site; convert a model only once")
    if type(module) is not expected:
        raise ValueError(f"cannot map {root_name}.{path}: it is {type(module).__name__}, expected torch.nn.{expected.__name__}")
    return module


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, module)


def _base_prefix(model: nn.Module) -> tuple[BertModel, str]:
    if isinstance(model, BertModel):
        return model, ""
    base = getattr(model, "bert", None)
    if not isinstance(base, BertModel):
        raise ValueError(f"cannot map {type(model).__name__}.bert: expected a BertModel")
    return base, "bert."


def to_supernet(model: nn.Module, space: SearchSpace) -> nn.Module:
    """Convert a Hugging Face BERT model into a mixed-precision supernet, in place; returns it.

    Supported: BertModel, BertForSequenceClassification, BertForTokenClassification,
    BertForQuestionAnswering. Embeddings and head are wrapped unless their candidates are one float. Every
    site is checked before the first is replaced: a model that cannot be converted is left as it was. The new
    parameters are made on the device of the weights they serve.
    """
    if not isinstance(model, SUPPORTED):
        names = ", ".join(c.__name__ for c in SUPPORTED)
        raise TypeError(f"to_supernet supports {names}; got {type(model).__name__}")
    base, prefix = _base_prefix(model)
    heads = base.config.num_attention_heads
    wcands = space.weight_candidates()
    acands = space.activation_candidates()
    if any(isinstance(m, (MixedLinear, MixedEmbedding)) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} is already a supernet; convert a model only once")

    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"cannot map {prefix}encoder.layer: expected a non-empty ModuleList of BertLayer")
    plan: list[tuple[nn.Module, str, Callable[[], nn.Module]]] = []  # (parent, path, the site's constructor)
    for i, layer in enumerate(layers):
        shared: list[ActQuantizer] = []  # one per layer, made with the layer's first site
        for path, by_heads in ENCODER_SITES.items():
            name = f"{prefix}encoder.layer.{i}.{path}"
            linear = _get(layer, path, f"{prefix}encoder.layer.{i}", nn.Linear)
            grouping = make_grouping(name, linear.out_features, space.groups, heads if by_heads else None)

            def build(linear=linear, grouping=grouping, path=path, shared=shared) -> nn.Module:
                site_acands: CandidateSet | ActQuantizer = acands
                if path in SHARED_INPUT:
                    if not shared:
                        shared.append(ActQuantizer(acands, base.config.hidden_size, space.init, linear.weight.device))
                    site_acands = shared[0]
                return MixedLinear(linear, SiteKind.ENCODER, wcands, grouping, site_acands, space.init)
            plan.append((layer, path, build))

    ecands = space.embedding_candidates()
    if not ecands.is_identity:
        for path in EMBEDDING_SITES:
            emb = _get(base.embeddings, path, f"{prefix}embeddings", nn.Embedding)
            grouping = make_grouping(f"{prefix}embeddings.{path}", emb.embedding_dim, space.embedding_group_count())
            plan.append((base.embeddings, path, lambda emb=emb, grouping=grouping: MixedEmbedding(emb, ecands, grouping, space.init)))

    hcands = space.head_candidates()
    if not hcands.is_identity:
        head_paths = [(base, "pooler.dense", f"{prefix}pooler")] if base.pooler is not None else []
        head_attr = next((a for cls, a in HEAD_SITES.items() if isinstance(model, cls)), None)
        if head_attr is not None:
            head_paths.append((model, head_attr, type(model).__name__))
        for root, path, root_name in head_paths:
            linear = _get(root, path, root_name, nn.Linear)
            full = f"{prefix}{path}" if root is base else path
            # a task head has a handful of rows: one group per row unless the space's count divides them
            n_groups = space.groups if space.groups == -1 or linear.out_features % space.groups == 0 else -1
            grouping = make_grouping(full, linear.out_features, n_groups)
            plan.append((root, path, lambda linear=linear, grouping=grouping: MixedLinear(
                linear, SiteKind.HEAD, hcands, grouping, acands, space.init)))

    for root, path, build in plan:  # every site checked: now replace them
        _set(root, path, build())

    n_sites = sum(1 for _ in sites(model))
    log.info("converted %s: %d mixed-precision sites, weight candidates %s", type(model).__name__, n_sites, list(wcands.bits))
    return model
