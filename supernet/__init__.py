"""bert-mpq's library: turn a Hugging Face BERT into a mixed-precision supernet and back.

Depends on torch and transformers only (no hydra, no wandb, nothing from the `search` app).
"""
from .architecture import Architecture, SiteArch
from .bert import to_supernet
from .cost import MIB, CostEntry, candidate_bits, Scope, SiteShape, Size, bitops, expected_bitops, expected_size, model_entries, size
from .groups import PER_ROW, Grouping, make_grouping
from .mixed import ActQuantizer, MixedEmbedding, MixedLinear, WeightQuantizer, set_relaxation, sites
from .packed import PackedSize, is_packed_dir, load_packed, read_manifest, save_packed
from .packing import pack_codes, packed_nbytes, unpack_codes
from .params import ParamSets, other_fp32_params, param_sets
from .quantizers import (
    CandidateSet,
    InitRule,
    QuantMode,
    init_step,
    lsq_fake_quant,
    mix_fake_quant,
    qrange,
    round_ste,
)
from .space import Relaxation, SearchSpace, SiteKind

__all__ = [
    "ActQuantizer", "Architecture", "CandidateSet", "CostEntry", "Grouping", "InitRule", "MIB", "MixedEmbedding",
    "MixedLinear", "PER_ROW", "PackedSize", "ParamSets", "QuantMode", "Relaxation", "Scope", "SearchSpace", "SiteArch", "SiteKind",
    "SiteShape", "Size", "WeightQuantizer", "bitops", "candidate_bits", "expected_bitops", "expected_size", "init_step",
    "is_packed_dir", "load_packed", "lsq_fake_quant", "make_grouping", "mix_fake_quant", "model_entries",
    "other_fp32_params", "pack_codes", "packed_nbytes", "param_sets", "qrange", "read_manifest", "round_ste", "save_packed",
    "set_relaxation", "sites", "size", "to_supernet", "unpack_codes",
]
