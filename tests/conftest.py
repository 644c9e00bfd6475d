"""Shared fixtures: tiny random BERTs (offline, fast) and the optional real-asset folder."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import BertConfig

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name: str) -> ModuleType:
    """tools/<name> as a module, imported as when it runs: with its own folder first on the path (benchlib)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name[:-3]}", ROOT / "tools" / name)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return module


def assets_dir() -> Path | None:
    """$MPQ_ASSETS, else ../shared/assets beside the repository; None when absent."""
    env = os.environ.get("MPQ_ASSETS")
    path = Path(env) if env else ROOT.parent / "shared" / "assets"
    return path if path.is_dir() else None


@pytest.fixture
def assets() -> Path:
    path = assets_dir()
    if path is None:
        pytest.skip("offline assets not found (set MPQ_ASSETS or place ../shared/assets)")
    return path


def tiny_config(**overrides) -> BertConfig:
    """vocab 99, hidden 32, 2 layers, 4 heads, FFN 40: every site divides into 4 groups."""
    kw = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
              max_position_embeddings=64, type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    kw.update(overrides)
    return BertConfig(**kw)


@pytest.fixture
def tiny_cfg() -> BertConfig:
    return tiny_config()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 99, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
