"""`stage=export`: a QAT run's model as a folder of really bit-packed weights (supernet.save_packed).

    python -m search stage=export export.run_dir=<a qat or pipeline run directory>

Takes the run's `quantized/` folder (a pipeline's `qat/quantized/`), writes `<run_dir>/packed/` with
`supernet.save_packed`, reloads it with `supernet.load_packed` and, with `export.verify=true`, checks
that on the dev split(s) its logits equal the QAT model's (within `export.tolerance`) and its labels are
identical, then scores it. metrics.json holds the size accounting: bytes on disk against the
architecture's exact size, the FP32 model and the fake-quantized QAT file.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from supernet import MIB, save_packed
from supernet.cost import FP32_BITS

from .config import EvalConfig, ExportConfig, MixedPrecision, TaskConfig
from .errors import UserError
from .evaluate import evaluate_sets, stage_metrics
from .loop import make_accelerator
from .models import load_tokenizer
from .prepare import task_data
from .quantized import QUANTIZED_DIR, WEIGHTS_FILE, is_quantized_dir, load_any_quantized, load_quantized, load_space
from .rundir import RunDir

__all__ = ["PACKED_DIR", "find_quantized", "compare_outputs", "run_export"]

log = logging.getLogger(__name__)

PACKED_DIR = "packed"
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def find_quantized(run_dir: str) -> Path:
    """The quantized/ folder of a qat run, a pipeline run (qat/quantized/), or the folder itself."""
    root = Path(run_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"export.run_dir={run_dir}: no such directory; pass the directory of a qat or pipeline run")
    for path in (root, root / QUANTIZED_DIR, root / "qat" / QUANTIZED_DIR):
        if is_quantized_dir(path):
            return path
    raise UserError(f"export.run_dir={run_dir} holds no {QUANTIZED_DIR}/ folder (nor qat/{QUANTIZED_DIR}/); pass the "
                    f"directory of a finished qat or pipeline run")


@torch.no_grad()
def compare_outputs(reference: nn.Module, other: nn.Module, loader: Iterable[Mapping[str, torch.Tensor]],
                    device: torch.device) -> dict[str, Any]:
    """Largest |logit difference| and whether every prediction (argmax, or the value for one output) agrees."""
    reference.eval()
    other.eval()
    worst, same, rows = 0.0, True, 0
    for batch in loader:
        inputs = {k: v.to(device) for k, v in batch.items() if k in _INPUTS}
        for a, b in zip(reference(**inputs).to_tuple(), other(**inputs).to_tuple()):
            worst = max(worst, float((a.float() - b.float()).abs().max()))
            same = same and (torch.equal(a.argmax(-1), b.argmax(-1)) if a.shape[-1] > 1 else torch.equal(a, b))
        rows += inputs["input_ids"].shape[0]
    return {"max_abs_logit_diff": worst, "identical_predictions": same, "examples": rows}


def run_export(
    cfg: ExportConfig,
    task: TaskConfig,
    evaluation: EvalConfig,
    run: RunDir,
    *,
    seed: int,
    max_eval_examples: int | None,
    mixed_precision: MixedPrecision,
    cache_dir: str | None,
) -> dict[str, Any]:
    """The `export` stage: write `<run>/packed/`, verify it against the QAT model, write metrics.json."""
    if cfg.run_dir is None:
        raise UserError("stage=export needs export.run_dir=<the directory of a qat or pipeline run>")
    source = find_quantized(cfg.run_dir)
    qat_model, arch, trained_on = load_quantized(source)
    if trained_on != task.name:
        raise UserError(f"{source} was trained on {trained_on}, not {task.name}; set task={trained_on}")
    if arch.scale_bits != FP32_BITS:  # QAT trains fp32 steps: rounding them would change the model
        raise UserError(f"{source}'s architecture prices {arch.scale_bits}-bit steps (space.scale_bits="
                        f"{arch.scale_bits}), but QAT trains fp32 ones, which a {arch.scale_bits}-bit export would "
                        f"round; export stores fp32 steps: run the search (or hawq) and qat with space.scale_bits=32")
    tokenizer = load_tokenizer(str(source))
    # the data before the run directory: a bad task.data_dir leaves nothing behind
    _, sets = task_data(task, tokenizer, evaluation, cache_dir, max_eval_examples, train=False)

    run.open()
    packed = run.path / PACKED_DIR
    sized = save_packed(qat_model, arch, load_space(source), packed, tokenizer=tokenizer,
                        metadata={"task": trained_on, "source": str(source.resolve())})
    model, _, _ = load_any_quantized(packed)
    size = sized.to_dict()
    size["qat_file_bytes"] = (source / WEIGHTS_FILE).stat().st_size  # fake-quantized: FP32 weights and all
    log.info("packed %s: %.3f MB on disk (model.safetensors) = exact %.3f MB + header %d B + padding %.0f B + "
             "activation steps %d B + buffers %d B; %+.2f%% vs exact; FP32 %.2f MB (%.1fx); folder %.3f MB",
             packed, sized.file_bytes / MIB, sized.exact_bytes / MIB, sized.header_bytes, sized.padding_bytes,
             sized.act_scale_bytes, sized.buffer_bytes, 100 * sized.overhead, sized.fp32_bytes / MIB,
             sized.fp32_bytes / sized.file_bytes, sized.folder_bytes / MIB)

    accelerator = make_accelerator(mixed_precision, seed)
    model, qat_model = model.to(accelerator.device), qat_model.to(accelerator.device)
    verify = None
    if cfg.verify:
        verify = {s.split: compare_outputs(qat_model, model, s.loader, accelerator.device) for s in sets}
        for split, v in verify.items():
            log.info("verify %s: %d examples, max |logit diff| %.3g, identical predictions: %s", split, v["examples"],
                     v["max_abs_logit_diff"], v["identical_predictions"])
        bad = {k: v for k, v in verify.items() if v["max_abs_logit_diff"] > cfg.tolerance or not v["identical_predictions"]}
        if bad:
            raise RuntimeError(f"the packed model does not reproduce the QAT model: {bad}; this is a bert-mpq bug")
    results = evaluate_sets(model, sets, task.name, accelerator)
    metrics = stage_metrics("export", task.name, str(source), results, architecture=arch.summary(), size=size,
                            verify=verify, packed=str(packed))
    run.write_json("metrics.json", metrics)
    run.logger.summary({"export": {"size": size, "verify": verify}, "eval": results})
    return metrics
