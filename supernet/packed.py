"""Packed export: a self-contained folder whose weights really take the bits the architecture says.

`save_packed(model, arch, space, folder)` writes a fixed quantized supernet as
  * model.safetensors: per site and bit-width, the integer codes of every group at that width, bit-packed
    (`supernet.packing`), and their steps (`space.scale_bits` each); groups at 16 / 32 bits as float16 /
    float32; nothing for pruned groups (architecture.json holds their index), and biases of kept rows only;
    each input quantizer's chosen step (and offset); everything outside the sites (LayerNorm, an FP32 head)
    as it is;
  * architecture.json, space.json and the HF config.json (naming the model class), the tokenizer when given;
  * packed.json: format, version, byte count and sha256 of every file above, and the size accounting.
`load_packed(folder)` needs only this library and transformers: it checks the manifest, rebuilds the
model, unpacks the codes into weights ((codes + half) * step, exactly what the fake quantizer computes) and returns
a model whose predictions equal the source's. A truncated or modified file is a one-line error.

Size accounting (`PackedSize`): the tensor file = the architecture's exact total size (supernet.cost)
+ safetensors header + the zero bits that fill each packed stream's last byte + the activation steps and
buffers, which the size model does not price. Nothing else.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig

from .architecture import Architecture, SiteArch
from .bert import to_supernet
from .cost import Scope
from .files import follow_umask
from .mixed import Site, fixed_codes, sites
from .packing import pack_codes, packed_nbytes, unpack_codes
from .quantizers import CandidateKind, candidate_kind, dequantize, qrange
from .space import SearchSpace, SiteKind

FORMAT = "bert-mpq.packed"
VERSION = 1
TENSORS_FILE = "model.safetensors"
MANIFEST_FILE = "packed.json"
ARCHITECTURE_FILE = "architecture.json"
SPACE_FILE = "space.json"
CONFIG_FILE = "config.json"
_FLOAT_DTYPES = {16: torch.float16, 32: torch.float32}


@dataclass(frozen=True)
class PackedSize:
    """Bytes of a packed folder against the architecture's exact size and the FP32 model."""

    file_bytes: int  # model.safetensors on disk
    exact_bytes: float  # Architecture.size_bytes("total"): what the cost model says
    header_bytes: int  # safetensors' JSON header and its length prefix
    padding_bytes: float  # zero bits filling the last byte of each packed stream
    act_scale_bytes: int  # input quantizers' steps and offsets (not priced by the size model)
    buffer_bytes: int  # persistent buffers outside the sites (not parameters)
    folder_bytes: int  # every file of the folder but packed.json: + config, architecture, space, tokenizer
    fp32_bytes: float  # the same model with every parameter in FP32

    @property
    def unaccounted_bytes(self) -> float:
        """file - (exact + header + padding + activation steps + buffers); zero for a correct export."""
        return self.file_bytes - (self.exact_bytes + self.header_bytes + self.padding_bytes + self.act_scale_bytes
                                  + self.buffer_bytes)

    @property
    def overhead(self) -> float:
        """(file - exact) / exact."""
        return self.file_bytes / self.exact_bytes - 1

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "unaccounted_bytes": self.unaccounted_bytes, "overhead": self.overhead,
                "metadata_bytes": self.folder_bytes - self.file_bytes,
                "compression_vs_fp32": self.fp32_bytes / self.file_bytes}


# --- model <-> tensors ---------------------------------------------------------------------------
def _by_bits(arch: SiteArch) -> Iterator[tuple[int, torch.Tensor]]:
    """(bits, indices of the groups at those bits), widths in increasing order."""
    bits = torch.tensor(arch.bits)
    for b in sorted(set(arch.bits)):
        yield b, (bits == b).nonzero().flatten()


def _kept_rows(arch: SiteArch) -> torch.Tensor:
    """[out] True where the row's group is not pruned."""
    return (torch.tensor(arch.bits) != 0).repeat_interleave(arch.rows_per_group)  # [G] -> [out]


def _site_owned(model: nn.Module) -> tuple[str, ...]:
    return tuple(f"{name}." for name, _ in sites(model))


def _check_fixed(model: nn.Module, arch: Architecture) -> None:
    """`model` is what a packed folder can hold exactly: fp32, fixed to `arch`, its activation steps set."""
    other = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if other:
        raise ValueError(f"the model holds {', '.join(other)} parameters; a packed folder rebuilds an fp32 model "
                         f"(mixed precision is autocast's, on fp32 weights): pack model.float()")
    unset = [n for n, s in sites(model) if s.aq is not None and not s.aq.cands.is_identity and not bool(s.aq.initialized)]
    if unset:
        raise ValueError(f"{unset[0]}'s activation steps are not set yet ({len(unset)} sites); the first forward sets "
                         f"them: run the model on a batch of real inputs before packing")
    searchable = [n for n, s in sites(model) if s.wq.searchable or (s.aq is not None and s.aq.searchable)]
    actual = Architecture.from_supernet(model, arch.scale_bits)
    if searchable or [(n, s.bits, s.a_bits) for n, s in actual] != [(n, s.bits, s.a_bits) for n, s in arch]:
        raise ValueError("the model is not fixed to this architecture; apply it (Architecture.apply) before packing")


def _check_space(model: nn.Module, space: SearchSpace) -> None:
    """`space` is the one `model` was converted with: load_packed rebuilds the model from it."""
    for name, site in sites(model):
        want = {SiteKind.ENCODER: space.weight_candidates, SiteKind.EMBEDDING: space.embedding_candidates,
                SiteKind.HEAD: space.head_candidates}[site.kind]()
        checks = [(f"{name} was converted with weight candidates", site.wq.cands, want)]
        if site.aq is not None:
            checks.append((f"{name}'s input was converted with", site.aq.cands, space.activation_candidates()))
        for what, have, given in checks:
            if have != given:
                raise ValueError(f"{what} {list(have.bits)} bits on the {have.mode.name} grid, the space given offers "
                                 f"{list(given.bits)} on the {given.mode.name} grid; pack with the space the model "
                                 f"was converted with")


@torch.no_grad()
def pack_model(model: nn.Module, arch: Architecture) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The packed tensors of a fixed quantized supernet, and the bytes that are not the exact size."""
    _check_fixed(model, arch)
    scale_dtype = _FLOAT_DTYPES[arch.scale_bits]
    tensors: dict[str, torch.Tensor] = {}
    extra = {"padding_bytes": 0.0, "act_scale_bytes": 0, "buffer_bytes": 0}
    shared: set[int] = set()
    for name, site in sites(model):
        sa = arch.site(name)
        grouped = site.to_groups(site.weight.detach()).float()  # [G, n]
        steps, codes, _ = fixed_codes(site)  # exactly the forward's codes and steps
        for b, idx in _by_bits(sa):
            kind = candidate_kind(b)
            if kind is CandidateKind.ZERO:
                continue  # a pruned group is its index in architecture.json and nothing else
            if kind is CandidateKind.FLOAT:
                tensors[f"{name}.f{b}"] = grouped[idx].to(_FLOAT_DTYPES[b]).contiguous()
                continue
            idx = idx.to(codes.device)
            step = steps[idx, 0]  # [m]
            unsigned = (codes[idx] - qrange(b, site.wq.cands.mode)[0]).to(torch.uint8)  # [m, n]
            tensors[f"{name}.q{b}"] = pack_codes(unsigned, b).cpu()
            tensors[f"{name}.s{b}"] = step.to(scale_dtype).contiguous()
            if not torch.equal(tensors[f"{name}.s{b}"].float(), step):
                raise ValueError(f"{name}: its steps are not {arch.scale_bits}-bit floats, so a {arch.scale_bits}-bit "
                                 f"export would change the model; write the architecture with scale_bits 32")
            extra["padding_bytes"] += tensors[f"{name}.q{b}"].numel() - unsigned.numel() * b / 8
        if site.bias is not None:
            tensors[f"{name}.bias"] = site.bias.detach()[_kept_rows(sa).to(site.bias.device)].float().contiguous()
        aq = site.aq
        if aq is not None and not aq.cands.is_identity and id(aq) not in shared:
            shared.add(id(aq))  # Q, K and V share one input quantizer: stored once, with the first of them
            k = int(aq.choice[0])
            tensors[f"{name}.a_step"] = aq.step.detach()[0, k:k + 1].float().clone()
            if aq.offset is not None:
                tensors[f"{name}.a_offset"] = aq.offset.detach()[0, k:k + 1].float().clone()
            extra["act_scale_bytes"] += 4 * (1 + (aq.offset is not None))
    params = {n for n, _ in model.named_parameters()}
    for key, value in _other_state(model).items():
        tensors[key] = value.detach().clone().contiguous()
        if key not in params:
            extra["buffer_bytes"] += value.numel() * value.element_size()
    return {k: v.cpu() for k, v in tensors.items()}, extra


def _other_state(model: nn.Module) -> dict[str, torch.Tensor]:
    owned = _site_owned(model)
    return {k: v for k, v in model.state_dict().items() if not k.startswith(owned)}


class _Tensors:
    """The loaded tensors, handed out one checked key at a time."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        self.tensors = dict(tensors)
        self.source = source

    def take(self, key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        t = self.tensors.pop(key, None)
        if t is None:
            raise ValueError(f"{self.source} has no tensor {key!r} that architecture.json needs; the folder is "
                             f"inconsistent, export it again")
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise ValueError(f"{self.source}: {key!r} is {t.dtype} {tuple(t.shape)}, architecture.json needs "
                             f"{dtype} {tuple(shape)}; the folder is inconsistent, export it again")
        return t

    def finish(self) -> None:
        if self.tensors:
            raise ValueError(f"{self.source} has {len(self.tensors)} tensors architecture.json does not name "
                             f"(e.g. {sorted(self.tensors)[:2]}); the folder is inconsistent, export it again")


@torch.no_grad()
def unpack_into(model: nn.Module, arch: Architecture, tensors: Mapping[str, torch.Tensor],
                source: str = TENSORS_FILE) -> nn.Module:
    """Fill a supernet fixed to `arch` from `pack_model`'s tensors (the inverse of pack_model)."""
    store = _Tensors(tensors, source)
    scale_dtype = _FLOAT_DTYPES[arch.scale_bits]
    shared: set[int] = set()
    for name, site in sites(model):
        sa = arch.site(name)
        grouped = torch.zeros_like(site.to_groups(site.weight.detach()))  # [G, n]; pruned groups stay zero
        for b, idx in _by_bits(sa):
            kind = candidate_kind(b)
            if kind is CandidateKind.ZERO:
                continue
            m = len(idx)
            if kind is CandidateKind.FLOAT:
                grouped[idx] = store.take(f"{name}.f{b}", _FLOAT_DTYPES[b], (m, sa.group_numel)).to(grouped)
                continue
            n = m * sa.group_numel
            data = store.take(f"{name}.q{b}", torch.uint8, (packed_nbytes(n, b),))
            step = store.take(f"{name}.s{b}", scale_dtype, (m,)).float()
            mode = site.wq.cands.mode
            codes = unpack_codes(data, b, n).view(m, sa.group_numel).float() + qrange(b, mode)[0]  # [m*n] -> [m, n]
            grouped[idx] = dequantize(codes, step[:, None], mode).to(grouped)
            site.wq.step[idx.to(site.wq.step.device), site.wq.cands.index(b)] = step.to(site.wq.step)
        site.weight.copy_(site.from_groups(grouped))
        if site.bias is not None:
            keep = _kept_rows(sa)
            bias = torch.zeros_like(site.bias)
            bias[keep.to(bias.device)] = store.take(f"{name}.bias", torch.float32, (int(keep.sum()),)).to(bias)
            site.bias.copy_(bias)
        _unpack_act(site, name, store, shared)
    other = {key: store.take(key, value.dtype, tuple(value.shape)) for key, value in _other_state(model).items()}
    model.load_state_dict(other, strict=False)
    store.finish()
    return model


def _unpack_act(site: Site, name: str, store: _Tensors, shared: set[int]) -> None:
    aq = site.aq
    if aq is None or aq.cands.is_identity or id(aq) in shared:
        return
    shared.add(id(aq))
    k = int(aq.choice[0])
    aq.step[0, k] = store.take(f"{name}.a_step", torch.float32, (1,))[0].to(aq.step)
    if aq.offset is not None:
        aq.offset[0, k] = store.take(f"{name}.a_offset", torch.float32, (1,))[0].to(aq.offset)
    aq.initialized.fill_(True)  # the steps came from the export: no re-initialisation on the first batch
    aq._refresh()


# --- folder --------------------------------------------------------------------------------------
def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _header_bytes(path: Path) -> int:
    with path.open("rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")  # safetensors: u64 header length, then the JSON header


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def save_packed(model: nn.Module, arch: Architecture, space: SearchSpace, folder: str | os.PathLike, *,
                tokenizer: Any = None, metadata: Mapping[str, Any] | None = None,
                overwrite: bool = False) -> PackedSize:
    """Write the packed folder of `model` (a supernet fixed to `arch`) atomically; returns its size accounting.

    `metadata` (JSON-able) is kept in packed.json for the application (e.g. the task).
    """
    folder = Path(folder)
    _check_space(model, space)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; choose another folder or pass overwrite=True")
    tensors, extra = pack_model(model, arch)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        # one metadata key: safetensors writes several in an unspecified order, and the bytes would differ
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": f"{FORMAT}/{VERSION}"})
        arch.save(tmp / ARCHITECTURE_FILE)
        (tmp / SPACE_FILE).write_text(json.dumps(space.to_dict(), indent=2) + "\n")
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]  # load_packed builds this class
        config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        hashed = [TENSORS_FILE, ARCHITECTURE_FILE, SPACE_FILE, CONFIG_FILE]
        files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _digest(tmp / name)} for name in hashed}
        sized = PackedSize(
            file_bytes=files[TENSORS_FILE]["bytes"], exact_bytes=arch.size_bytes(Scope.TOTAL),
            header_bytes=_header_bytes(tmp / TENSORS_FILE), padding_bytes=extra["padding_bytes"],
            act_scale_bytes=int(extra["act_scale_bytes"]), buffer_bytes=int(extra["buffer_bytes"]),
            folder_bytes=_folder_bytes(tmp), fp32_bytes=arch.fp32_bytes(Scope.TOTAL),
        )
        manifest = {"format": FORMAT, "version": VERSION, "files": files, "size": sized.to_dict(),
                    "metadata": dict(metadata or {})}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        follow_umask(tmp)  # safetensors writes 0600
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(folder)
    return sized


def is_packed_dir(path: str | os.PathLike) -> bool:
    return (Path(path).expanduser() / MANIFEST_FILE).is_file()


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """packed.json of `folder`, after checking every file it lists (bytes and sha256)."""
    folder = Path(folder).expanduser()
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a packed model folder (no {MANIFEST_FILE}); pass the folder "
                                f"stage=export wrote")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}); export the model again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a bert-mpq packed manifest (no \"format\": \"{FORMAT}\")")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path} has version {manifest.get('version')!r}; this bert-mpq reads version {VERSION}")
    for name, meta in manifest.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing from the packed folder; export the model again")
        actual = file.stat().st_size
        if actual != meta["bytes"]:
            raise ValueError(f"{file} has {actual} bytes, the manifest says {meta['bytes']} (truncated or "
                             f"modified); export the model again")
        if _digest(file) != meta["sha256"]:
            raise ValueError(f"{file} was modified after export (sha256 differs from {MANIFEST_FILE}); export the "
                             f"model again")
    return manifest


def _model_class(config: Any, source: Path) -> type:
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise ValueError(f"{source / CONFIG_FILE} names no transformers model class in \"architectures\" "
                         f"({names}); export the model again")
    return cls


def load_packed(folder: str | os.PathLike, device: torch.device | str | None = None
                ) -> tuple[nn.Module, Architecture, dict[str, Any]]:
    """(model in eval mode, its architecture, the manifest's metadata) from a folder `save_packed` wrote."""
    folder = Path(folder).expanduser()
    manifest = read_manifest(folder)
    arch = Architecture.load(folder / ARCHITECTURE_FILE)
    space = SearchSpace.from_dict(json.loads((folder / SPACE_FILE).read_text()), str(folder / SPACE_FILE))
    config = AutoConfig.from_pretrained(str(folder))
    model = _model_class(config, folder)(config)
    to_supernet(model, space)
    arch.apply(model)
    try:
        tensors = load_file(str(folder / TENSORS_FILE))
    except SafetensorError as e:
        raise ValueError(f"{folder / TENSORS_FILE} is not a readable safetensors file ({e}); export the model "
                         f"again") from None
    unpack_into(model, arch, tensors, str(folder / TENSORS_FILE))
    if device is not None:
        model.to(device)
    return model.eval(), arch, dict(manifest.get("metadata", {}))
