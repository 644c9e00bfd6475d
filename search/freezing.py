"""Iterative weight freezing against oscillations in QAT (Nagel et al., "Overcoming Oscillations in
Quantization-Aware Training", ICML 2022, arXiv:2203.11086).

Near a rounding boundary a latent weight can flip between two integer codes every few steps: the
straight-through gradient pushes it back and forth, which hurts low-bit QAT (2-3 bits most). After every
optimiser step, for each quantized weight:
  * it oscillates when its integer code moved, and in the direction opposite to its previous move;
  * its oscillation frequency f is an exponential moving average of those events (momentum m);
  * once f > threshold it is frozen: from then on it stays at that integer code (w = code * step, on the
    group's current step), whatever its gradient says.
Pruned and float groups are never frozen. The state is saved with the train state, so `resume=true`
continues with the same frozen weights. The paper freezes at the EMA of the integer value; this freezes at
the code of the step on which the threshold is crossed (one of the two codes it flipped between).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from supernet import sites
from supernet.mixed import fixed_codes
from supernet.quantizers import dequantize

__all__ = ["OscillationFreezer"]


class OscillationFreezer:
    """Tracks every quantized weight's oscillation frequency and freezes the ones above `threshold`."""

    def __init__(self, model: nn.Module, threshold: float, momentum: float = 0.99) -> None:
        if not 0 < threshold <= 1 or not 0 <= momentum < 1:
            raise ValueError(f"freezing needs 0 < threshold <= 1 and 0 <= momentum < 1, got {threshold}, {momentum}")
        self.threshold, self.momentum = threshold, momentum
        self.sites = [(name, s) for name, s in sites(model) if s.wq.fixed and not s.wq.cands.is_identity]
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        for name, site in self.sites:
            _, codes, _ = fixed_codes(site)
            self.state[name] = {
                "codes": codes.to(torch.int8),  # [G, n] the codes after the last step
                "direction": torch.zeros_like(codes, dtype=torch.int8),  # sign of the last move, 0 before any
                "frequency": torch.zeros_like(codes),  # EMA of oscillation events
                "frozen": torch.zeros_like(codes, dtype=torch.bool),
                "frozen_codes": torch.zeros_like(codes, dtype=torch.int8),
            }

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        """Update after an optimiser step; returns the fraction of quantized weights frozen and oscillating."""
        frozen = oscillating = total = 0
        for name, site in self.sites:
            st = self.state[name]
            steps, codes, quantized = fixed_codes(site)
            delta = codes - st["codes"].float()
            moved = delta != 0
            direction = torch.sign(delta).to(torch.int8)
            event = moved & (direction != st["direction"]) & (st["direction"] != 0)
            st["frequency"].mul_(self.momentum).add_(event.float(), alpha=1 - self.momentum)
            st["direction"] = torch.where(moved, direction, st["direction"])
            new = (st["frequency"] > self.threshold) & ~st["frozen"] & quantized[:, None]
            st["frozen_codes"] = torch.where(new, codes.to(torch.int8), st["frozen_codes"])
            st["frozen"] |= new
            if st["frozen"].any():  # hold the frozen weights on their codes, on the group's current step
                grouped = site.to_groups(site.weight.detach()).clone()
                grouped = torch.where(st["frozen"], dequantize(st["frozen_codes"].float(), steps, site.wq.cands.mode), grouped)
                site.weight.copy_(site.from_groups(grouped))
                codes = torch.where(st["frozen"], st["frozen_codes"].float(), codes)
            st["codes"] = codes.to(torch.int8)
            n = int(quantized.sum()) * codes.shape[1]
            total += n
            frozen += int(st["frozen"].sum())
            oscillating += int(((st["frequency"] > 0) & quantized[:, None]).sum())
        return {"freeze/frozen": frozen / max(total, 1), "freeze/oscillating": oscillating / max(total, 1)}

    def state_dict(self) -> dict[str, Any]:
        return {name: {k: v.cpu() for k, v in st.items()} for name, st in self.state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, st in state.items():
            device = self.state[name]["codes"].device
            self.state[name] = {k: v.to(device) for k, v in st.items()}
