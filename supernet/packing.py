"""Bit-packing of unsigned integer codes: the on-disk form of a quantized group.

A `bits`-bit code stream is little-endian at the bit level: code i occupies stream bits
[i * bits, (i + 1) * bits), least significant bit first, and stream bit j is bit j % 8 of byte j // 8.
So 8-bit codes are plain bytes, 4-bit codes sit two per byte (low nibble first), 2-bit codes four per
byte, and 3-, 5-, 6- and 7-bit codes run across byte boundaries. The last byte is zero-padded.
Packing works in chunks of whole bytes, so the temporaries stay small for any number of codes.
"""
from __future__ import annotations

import torch

MAX_BITS = 8
_CHUNK = 1 << 20  # codes per chunk; a multiple of 8, so every chunk ends on a byte boundary


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that `n` codes of `bits` bits take once packed."""
    _check_bits(bits)
    if n < 0:
        raise ValueError(f"{n} codes: a count cannot be negative")
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"cannot pack {bits!r}-bit codes; use 1..{MAX_BITS} bits")


def _shifts(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, dtype=torch.uint8, device=device)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes in [0, 2**bits) (any integer dtype and shape, read flat) -> packed uint8 [packed_nbytes]."""
    _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.is_floating_point() or flat.is_complex():
        raise TypeError(f"codes must be integers, got {flat.dtype}")
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits} bits, got [{int(flat.min())}, {int(flat.max())}]")
    flat = flat.to(torch.uint8)
    out = torch.empty(packed_nbytes(flat.numel(), bits), dtype=torch.uint8, device=flat.device)
    code_shifts, byte_shifts = _shifts(bits, flat.device), _shifts(8, flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start:start + _CHUNK]
        stream = ((chunk.unsqueeze(1) >> code_shifts) & 1).reshape(-1)  # [n] -> [n, bits] -> [n * bits]
        pad = (-stream.numel()) % 8
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        packed = (stream.view(-1, 8) << byte_shifts).sum(1, dtype=torch.uint8)  # [n * bits / 8, 8] -> bytes
        first = start * bits // 8
        out[first:first + packed.numel()] = packed
    return out


def unpack_codes(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first `n` codes of a packed stream -> uint8 [n]; `data` must hold exactly packed_nbytes(n, bits)."""
    _check_bits(bits)
    data = data.reshape(-1)
    if data.dtype != torch.uint8:
        raise TypeError(f"packed data must be uint8, got {data.dtype}")
    if data.numel() != packed_nbytes(n, bits):
        raise ValueError(f"{n} codes of {bits} bits need {packed_nbytes(n, bits)} bytes, got {data.numel()}")
    out = torch.empty(n, dtype=torch.uint8, device=data.device)
    code_shifts, byte_shifts = _shifts(bits, data.device), _shifts(8, data.device)
    for start in range(0, n, _CHUNK):
        count = min(_CHUNK, n - start)
        first = start * bits // 8
        chunk = data[first:first + packed_nbytes(count, bits)]
        stream = ((chunk.unsqueeze(1) >> byte_shifts) & 1).reshape(-1)[: count * bits]  # bytes -> [8 * bytes]
        out[start:start + count] = (stream.view(count, bits) << code_shifts).sum(1, dtype=torch.uint8)  # [n, bits] -> [n]
    return out
