"""What the benchmark scripts in tools/ share: the machine's name, device sync, and peak memory of a step.

Peak memory is measured in a child process of its own, so that nothing the parent allocated counts: the
child builds what it needs, notes its RSS, runs the steps, and reports its RSS high-water mark (VmHWM)
and, on CUDA, torch's max_memory_allocated, both also as the growth over the moment before the first step.
"""
from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
from typing import Callable

import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """This process's own RSS high-water mark (VmHWM); ru_maxrss would include the parent's from before exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def step_memory(step: Callable[[], object], device: str, steps: int = 2) -> dict[str, float]:
    """Run `step` `steps` times in this (child) process; its peak memory, total and over the start."""
    before = rss_mb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(steps):
        step()
    sync(device)
    peak = peak_rss_mb()
    out = {"rss_before_mb": before, "rss_peak_mb": peak, "step_peak_mb": peak - before}
    if device.startswith("cuda"):
        out["cuda_before_mb"] = base / 2**20
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_step_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out


def run_child(script: str, args: list[str]) -> dict[str, float]:
    """`python script *args` in a fresh process; the JSON object on its last line of output."""
    res = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed (exit {res.returncode}):\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])
