"""The quantized model of an Architecture, in memory and on disk.

`quantize` turns an FP model into the discrete quantized model of any architecture (searched, HAWQ-V2 or
hand-written): its candidates are exactly the bits the architecture uses. `save_quantized` writes what a
QAT run produces, `<run_dir>/quantized/`: the supernet's state (weights, LSQ steps, fixed choices),
architecture.json, the space, the HF config and tokenizer; `load_quantized` rebuilds the model from it.
`load_any_quantized` also reads the bit-packed folder `stage=export` writes (supernet.load_packed).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig

from supernet import Architecture, SearchSpace, SiteKind, is_packed_dir, load_packed, to_supernet
from supernet.files import follow_umask

from .errors import UserError, first_line
from .models import MODEL_CLASSES, TASK_FILE
from .rundir import replace_dir, temp_beside
from .tasks import get_task

QUANTIZED_DIR = "quantized"
SPACE_FILE = "space.json"
WEIGHTS_FILE = "model.safetensors"

log = logging.getLogger(__name__)


def space_for(arch: Architecture, base: SearchSpace) -> SearchSpace:
    """`base` with, per kind of site, exactly the bits `arch` uses as candidates (and its group counts), on
    the weight grid `arch` records (base's when it records none)."""

    def used(kind: SiteKind) -> list[int]:
        return sorted({b for _, s in arch if s.kind is kind for b in s.bits}) or [32]

    def groups(kind: SiteKind) -> int | None:
        counts = {(len(s.bits), s.rows_per_group) for _, s in arch if s.kind is kind}
        if not counts:
            return None
        if all(rows == 1 for _, rows in counts):
            return -1  # one group per row, whatever the site's size
        return next(iter(counts))[0]

    a_bits = sorted({s.a_bits for _, s in arch if s.a_bits is not None}) or [32]
    return dataclasses.replace(
        base, w_bits=used(SiteKind.ENCODER), a_bits=a_bits, embedding_bits=used(SiteKind.EMBEDDING),
        head_bits=used(SiteKind.HEAD), groups=groups(SiteKind.ENCODER) or base.groups,
        embedding_groups=groups(SiteKind.EMBEDDING), w_grid=arch.w_grid or base.w_grid,
    )


def quantize(model: nn.Module, arch: Architecture, base: SearchSpace) -> nn.Module:
    """Convert `model` in place to the discrete quantized model of `arch`."""
    to_supernet(model, space_for(arch, base))
    return arch.apply(model)


def load_architecture(path: str, option: str) -> Architecture:
    """The architecture.json the user named in `option`; a missing or malformed file is a UserError."""
    try:
        return Architecture.load(path)
    except FileNotFoundError:
        raise UserError(f"{option}={path}: no such file; pass the architecture.json of a search or hawq run") from None
    except ValueError as e:  # malformed JSON or values: the file is the user's
        raise UserError(str(e)) from e


def quantize_user_model(model: nn.Module, arch: Architecture, base: SearchSpace, arch_name: str, source: str) -> nn.Module:
    """`quantize`, with an architecture that does not fit the model (it names the site) as a UserError."""
    if arch.w_grid is not None and arch.w_grid is not base.w_grid:
        log.warning("%s is on the %s weight grid, and the model is built on it (not on space.w_grid=%s)",
                    arch_name, arch.w_grid.name, base.w_grid.name)
    try:
        return quantize(model, arch, base)
    except ValueError as e:
        raise UserError(f"{arch_name} does not fit {source}: {e}") from e


def save_quantized(model: nn.Module, arch: Architecture, space: SearchSpace, tokenizer: Any, task: str,
                   target: Path) -> Path:
    """Write the QAT'd model atomically: supernet state, architecture, space, HF config, tokenizer."""
    tmp = temp_beside(target)
    tmp.mkdir(parents=True, exist_ok=False)
    save_model(model, str(tmp / WEIGHTS_FILE))  # handles the Q/K/V-shared input quantizer
    arch.save(tmp / "architecture.json")
    (tmp / SPACE_FILE).write_text(json.dumps(space.to_dict(), indent=2) + "\n")
    model.config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / TASK_FILE).write_text(json.dumps({"task": task}) + "\n")
    follow_umask(tmp)  # safetensors writes 0600
    replace_dir(tmp, target)
    return target


def load_space(path: Path) -> SearchSpace:
    """The space a quantized/ folder's model was converted with."""
    return SearchSpace.from_dict(json.loads((path / SPACE_FILE).read_text()), str(path / SPACE_FILE))


def is_quantized_dir(path: str | Path) -> bool:
    p = Path(path).expanduser()
    return ((p / "architecture.json").is_file() and (p / SPACE_FILE).is_file() and (p / WEIGHTS_FILE).is_file()
            and not is_packed_dir(p))  # a packed folder has the same three files, holding codes


def load_quantized(path: str | Path) -> tuple[nn.Module, Architecture, str]:
    """Rebuild (model, architecture, task) from a `quantized/` folder written by `save_quantized`."""
    path = Path(path).expanduser()
    if not is_quantized_dir(path):
        raise FileNotFoundError(f"{path} is not a quantized model folder (needs architecture.json, {SPACE_FILE}, "
                                f"{WEIGHTS_FILE}); pass the quantized/ folder a qat run wrote")
    try:  # a truncated or edited file of the folder is the user's to write again, not a bert-mpq bug
        arch = Architecture.load(path / "architecture.json")
        space = load_space(path)
        task = json.loads((path / TASK_FILE).read_text())["task"]
        config = AutoConfig.from_pretrained(str(path))
        model = MODEL_CLASSES[get_task(task).kind].from_config(config)
        to_supernet(model, space)
        arch.apply(model)
        missing, unexpected = load_model(model, str(path / WEIGHTS_FILE), strict=False)
    except (ValueError, OSError, KeyError, SafetensorError) as e:
        raise UserError(f"{path} cannot be read as a quantized model ({type(e).__name__}: {first_line(e)}); "
                        f"run the qat stage again to write it") from e
    if missing or unexpected:
        raise UserError(f"{path / WEIGHTS_FILE} does not match its architecture ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected tensors, e.g. {(missing or unexpected)[:2]}); re-run qat")
    for module in model.modules():  # the fixed choices and initialised flags came in as buffers
        if hasattr(module, "_refresh"):
            module._refresh()
    return model.eval(), arch, task


def load_any_quantized(path: str | Path) -> tuple[nn.Module, Architecture, str] | None:
    """(model, architecture, task) of a qat run's quantized/ folder or an exported packed folder; None if neither."""
    if is_quantized_dir(path):
        return load_quantized(path)
    if not is_packed_dir(path):
        return None
    try:
        model, arch, meta = load_packed(path)
    except ValueError as e:  # a corrupt or tampered folder is the user's to re-export
        raise UserError(first_line(e)) from e
    return model, arch, str(meta.get("task"))
