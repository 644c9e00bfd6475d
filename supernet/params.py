"""The three disjoint parameter sets of a supernet, for the bilevel optimiser.

Chosen by module identity, never by name: logits (`alpha`) of every quantizer are architecture
parameters, their steps and offsets are quantizer scales, and everything else (the shared FP weights,
biases, LayerNorm, heads) are model weights.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .mixed import ActQuantizer, WeightQuantizer, sites


@dataclass(frozen=True)
class ParamSets:
    arch: list[nn.Parameter]
    scales: list[nn.Parameter]
    weights: list[nn.Parameter]


def param_sets(model: nn.Module) -> ParamSets:
    """Split `model`'s parameters into (architecture logits, quantizer scales, model weights)."""
    arch: dict[int, nn.Parameter] = {}
    scales: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, (WeightQuantizer, ActQuantizer)):
            if module.alpha is not None:
                arch[id(module.alpha)] = module.alpha
            scales[id(module.step)] = module.step
            offset = getattr(module, "offset", None)
            if offset is not None:
                scales[id(offset)] = offset
    weights: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        if id(p) not in arch and id(p) not in scales:
            weights[id(p)] = p
    return ParamSets(list(arch.values()), list(scales.values()), list(weights.values()))


def other_fp32_params(model: nn.Module) -> int:
    """Number of model weights outside every site's weight and bias (kept in FP32)."""
    in_sites: set[int] = set()
    for _, site in sites(model):
        in_sites.add(id(site.weight))
        if site.bias is not None:
            in_sites.add(id(site.bias))
    return sum(p.numel() for p in param_sets(model).weights if id(p) not in in_sites)
