"""Bit-packing and the packed export: exact round trips, identical predictions, honest sizes, clear errors."""
from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from transformers import BertForQuestionAnswering, BertForSequenceClassification, BertForTokenClassification

from conftest import ROOT, tiny_config
from supernet import (
    Architecture,
    SearchSpace,
    SiteKind,
    load_packed,
    pack_codes,
    packed_nbytes,
    read_manifest,
    save_packed,
    sites,
    to_supernet,
    unpack_codes,
)
from supernet.files import umask_mode
from supernet.packed import MANIFEST_FILE, TENSORS_FILE
from supernet.quantizers import QuantMode

SPACE = SearchSpace(w_bits=[0, 2, 3, 4, 8, 16], groups=4, a_bits=[8], a_mode="asymmetric", embedding_bits=[3, 4, 8],
                    embedding_groups=-1, head_bits=[0, 4, 32])  # per-column embedding groups of 97: odd streams


@pytest.fixture
def cfg97():
    return tiny_config(vocab_size=97)


def _reference_pack(codes: list[int], bits: int) -> bytes:
    """The documented layout written out bit by bit: code i at stream bits [i*bits, (i+1)*bits), LSB first."""
    stream = [(c >> j) & 1 for c in codes for j in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return bytes(sum(bit << j for j, bit in enumerate(stream[i:i + 8])) for i in range(0, len(stream), 8))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 3, 7, 8, 13, 1001])
def test_pack_unpack_round_trip_is_exact_and_matches_the_documented_layout(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (n,), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits) == (n * bits + 7) // 8
    assert bytes(packed.tolist()) == _reference_pack(codes.tolist(), bits)
    assert torch.equal(unpack_codes(packed, bits, n).long(), codes)


def test_packing_crosses_chunks(monkeypatch):
    import supernet.packing as packing

    monkeypatch.setattr(packing, "_CHUNK", 16)
    codes = torch.randint(0, 8, (101,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_codes(pack_codes(codes, 3), 3, 101).long(), codes)
    assert bytes(pack_codes(codes, 3).tolist()) == _reference_pack(codes.tolist(), 3)


def test_known_bytes():
    assert pack_codes(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]  # four per byte, first code lowest
    assert pack_codes(torch.tensor([5, 10]), 4).tolist() == [0xA5]  # two per byte, low nibble first
    assert pack_codes(torch.tensor([7, 0, 5]), 3).tolist() == [0b01000111, 0b1]  # a 3-bit stream across bytes


@pytest.mark.parametrize("bad, error", [
    ((torch.tensor([4]), 2), "lie in"), ((torch.tensor([-1]), 3), "lie in"), ((torch.tensor([1]), 9), "1..8"),
    ((torch.tensor([1.0]), 2), "integers"),
])
def test_pack_rejects_bad_input(bad, error):
    with pytest.raises((ValueError, TypeError), match=error):
        pack_codes(*bad)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 3, 5)


MIDRISE_SPACE = SearchSpace(w_bits=[0, 1, 2, 3, 4], w_grid="midrise", groups=4, embedding_bits=[1, 4],
                            embedding_groups=-1, head_bits=[2, 32])  # binary and mid-rise codes, odd streams


def _quantized(model, seed: int, space: SearchSpace = SPACE, forward: bool = True):
    """A supernet of `model` fixed to a random architecture using every candidate; trained-looking steps; with
    `forward`, run once, which sets its activation steps."""
    torch.manual_seed(seed)
    to_supernet(model, space)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, site in sites(model):
            if site.wq.alpha is not None:
                site.wq.alpha.copy_(torch.randn(site.wq.alpha.shape, generator=g))
            site.wq.step.mul_(1 + 0.1 * torch.rand(site.wq.step.shape, generator=g))
    arch = Architecture.from_supernet(model)
    arch.apply(model).eval()
    if forward:
        with torch.no_grad():
            model(**_inputs())
    return model, arch


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 97, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


@pytest.mark.parametrize("cls", [BertForSequenceClassification, BertForTokenClassification, BertForQuestionAnswering])
def test_export_reload_predicts_identically_and_sizes_are_accounted_for(tmp_path, cfg97, cls):
    model, arch = _quantized(cls(cfg97), seed=1)
    used = {b for _, s in arch for b in s.bits}
    assert {0, 2, 3, 4, 8, 16} <= used and any(s.kind is SiteKind.EMBEDDING for _, s in arch)
    with torch.no_grad():
        model(**_inputs())  # initialises the activation steps, as training would have
        ref = model(**_inputs()).to_tuple()
    size = save_packed(model, arch, SPACE, tmp_path / "packed", metadata={"task": "x"})
    loaded, arch2, meta = load_packed(tmp_path / "packed")
    assert type(loaded) is cls and arch2 == arch and meta == {"task": "x"}
    with torch.no_grad():
        for a, b in zip(ref, loaded(**_inputs()).to_tuple()):
            assert torch.equal(a, b)
    for (name, site), (_, site2) in zip(sites(model), sites(loaded)):
        assert torch.equal(site.quantized_weight()[0], site2.quantized_weight()[0]), name
    # bytes on disk = exact size + header + padding + activation steps + buffers, to the byte
    assert size.file_bytes == (tmp_path / "packed" / TENSORS_FILE).stat().st_size
    assert size.exact_bytes == pytest.approx(arch.size_bytes("total"))
    assert abs(size.unaccounted_bytes) < 1e-6
    assert size.padding_bytes > 0  # 3-bit streams of an odd number of codes end mid-byte
    # every file as readable as the umask allows (safetensors alone would write 0600)
    assert {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "packed").iterdir()} == {
        f.name: umask_mode() for f in (tmp_path / "packed").iterdir()}
    assert size.act_scale_bytes == 8 * len({id(s.aq) for _, s in sites(model) if s.aq is not None})  # step + offset
    # the same model exports to the same bytes (hashes of shipped models can be compared)
    save_packed(model, arch, SPACE, tmp_path / "again", metadata={"task": "x"})
    for name in (TENSORS_FILE, MANIFEST_FILE):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "packed" / name).read_bytes(), name


def test_midrise_and_binary_weights_export_and_reload_identically(tmp_path, cfg97):
    """The mid-rise grid stores the same unsigned codes as the symmetric one and rebuilds (c + 1/2) * s; its
    1-bit groups take one bit a weight."""
    model, arch = _quantized(BertForSequenceClassification(cfg97), seed=2, space=MIDRISE_SPACE)
    assert {0, 1, 2, 3, 4} <= {b for _, s in arch for b in s.bits}
    with torch.no_grad():
        model(**_inputs())
        ref = model(**_inputs()).logits
    size = save_packed(model, arch, MIDRISE_SPACE, tmp_path / "packed")
    loaded, arch2, _ = load_packed(tmp_path / "packed")
    assert arch2 == arch
    with torch.no_grad():
        assert torch.equal(loaded(**_inputs()).logits, ref)
    for (name, site), (_, site2) in zip(sites(model), sites(loaded)):
        assert site2.wq.cands.mode is QuantMode.MIDRISE
        w = site2.quantized_weight()[0]
        assert torch.equal(site.quantized_weight()[0], w), name
        if site.kind is SiteKind.EMBEDDING:  # mid-rise: a kept weight is never zero
            bits = torch.tensor(site.wq.chosen_bits()).repeat_interleave(site.grouping.size)  # [D]
            assert (w[:, bits > 0] != 0).all(), name
    assert size.exact_bytes == pytest.approx(arch.size_bytes("total")) and abs(size.unaccounted_bytes) < 1e-6


def test_packed_weights_take_their_bits(tmp_path, cfg97):
    """A uniform 2-bit encoder stores a quarter of a byte per weight (plus one step per group)."""
    model = to_supernet(BertForSequenceClassification(cfg97), SearchSpace(w_bits=[2], groups=4, embedding_bits=[8]))
    arch = Architecture.from_supernet(model)
    arch.apply(model).eval()(**_inputs())  # the first forward sets the activation steps
    save_packed(model, arch, SearchSpace(w_bits=[2], groups=4), tmp_path / "p")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "p" / TENSORS_FILE), "pt") as f:
        for name, site in sites(model):
            if site.kind is SiteKind.ENCODER:
                assert f.get_slice(f"{name}.q2").get_shape() == [site.weight.numel() // 4]
                assert f.get_slice(f"{name}.s2").get_shape() == [4]


def test_the_folder_loads_in_a_fresh_process_without_the_app(tmp_path, cfg97):
    model, arch = _quantized(BertForSequenceClassification(cfg97), seed=2)
    with torch.no_grad():
        model(**_inputs())
        ref = model(**_inputs()).logits
    save_packed(model, arch, SPACE, tmp_path / "packed")
    torch.save(_inputs(), tmp_path / "inputs.pt")
    code = (f"import sys, torch, supernet; m, a, _ = supernet.load_packed({str(tmp_path / 'packed')!r}); "
            f"x = torch.load({str(tmp_path / 'inputs.pt')!r}); torch.save(m(**x).logits.detach(), {str(tmp_path / 'out.pt')!r}); "
            "assert not any(k == 'search' or k.startswith(('search.', 'hydra', 'wandb')) for k in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)
    assert torch.equal(torch.load(tmp_path / "out.pt"), ref)


@pytest.fixture
def packed(tmp_path, cfg97):
    model, arch = _quantized(BertForSequenceClassification(cfg97), seed=3)
    save_packed(model, arch, SPACE, tmp_path / "packed")
    return tmp_path / "packed"


def test_a_truncated_file_is_a_clear_error(packed):
    data = (packed / TENSORS_FILE).read_bytes()
    (packed / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"has \d+ bytes, the manifest says \d+ \(truncated or modified\)"):
        load_packed(packed)


def test_a_tampered_file_is_a_clear_error(packed):
    data = bytearray((packed / TENSORS_FILE).read_bytes())
    data[-100] ^= 0xFF  # one flipped byte inside some tensor: same length, different content
    (packed / TENSORS_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="modified after export"):
        load_packed(packed)


def test_an_inconsistent_folder_is_a_clear_error(packed):
    """A tensor file that passes the checksum (the manifest rewritten too) but lacks a tensor still fails."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(packed / TENSORS_FILE))
    tensors.pop(next(k for k in tensors if ".q" in k))
    save_file(tensors, str(packed / TENSORS_FILE))
    manifest = json.loads((packed / MANIFEST_FILE).read_text())
    import hashlib

    manifest["files"][TENSORS_FILE] = {"bytes": (packed / TENSORS_FILE).stat().st_size,
                                       "sha256": hashlib.sha256((packed / TENSORS_FILE).read_bytes()).hexdigest()}
    (packed / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="has no tensor .* that architecture.json needs"):
        load_packed(packed)


def test_missing_or_foreign_folders_are_clear_errors(tmp_path, packed):
    with pytest.raises(FileNotFoundError, match="not a packed model folder"):
        load_packed(tmp_path)
    (packed / "space.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing from the packed folder"):
        read_manifest(packed)
    (packed / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_manifest(packed)


def test_save_refuses_to_overwrite_and_needs_a_fixed_model(tmp_path, packed, cfg97):
    model, arch = _quantized(BertForSequenceClassification(cfg97), seed=3)
    before = (packed / TENSORS_FILE).read_bytes()
    with pytest.raises(FileExistsError, match="exists"):
        save_packed(model, arch, SPACE, packed)
    assert (packed / TENSORS_FILE).read_bytes() == before
    for _, site in sites(model):
        site.wq.unfix()
    with pytest.raises(ValueError, match="not fixed to this architecture"):
        save_packed(model, arch, SPACE, tmp_path / "other")
    assert not (tmp_path / "other").exists() and not list(tmp_path.glob(".other*"))


def test_steps_that_fp16_cannot_hold_are_not_silently_rounded(tmp_path, cfg97):
    model, arch = _quantized(BertForSequenceClassification(cfg97), seed=4)
    half = Architecture(arch.sites, arch.other_params, scale_bits=16)
    with pytest.raises(ValueError, match="not 16-bit floats"):
        save_packed(model, half, SPACE, tmp_path / "p16")
    assert not (tmp_path / "p16").exists()


def test_what_would_not_reload_as_the_same_model_is_refused_before_writing(tmp_path, cfg97):
    # each of these wrote a folder that reloaded to another model (or not at all), without an error
    model, arch = _quantized(BertForSequenceClassification(cfg97), seed=3, forward=False)
    with pytest.raises(ValueError, match="activation steps are not set yet .* run the model on a batch"):
        save_packed(model, arch, SPACE, tmp_path / "unset")  # placeholder steps of 1.0, set by the first forward
    model(**_inputs())
    other_grid = dataclasses.replace(SPACE, a_mode=QuantMode.UNSIGNED)
    with pytest.raises(ValueError, match="input was converted with .* ASYMMETRIC grid, the space given offers .* UNSIGNED"):
        save_packed(model, arch, other_grid, tmp_path / "grid")
    with pytest.raises(ValueError, match="was converted with weight candidates"):
        save_packed(model, arch, dataclasses.replace(SPACE, w_bits=[8]), tmp_path / "bits")
    with pytest.raises(ValueError, match="torch.bfloat16 parameters; .* pack model.float"):
        save_packed(copy.deepcopy(model).to(torch.bfloat16), arch, SPACE, tmp_path / "bf16")
    assert not list(tmp_path.iterdir())
    save_packed(model, arch, SPACE, tmp_path / "ok")
