"""Measurement primitives shared by the benchmark sections: machine facts, FLOP counts, matmul peak, timing.

FLOPs are *model* FLOPs from torch.utils.flop_counter (matmuls, convolutions, attention; elementwise
ops count zero), so model FLOPs utilisation (MFU) = FLOPs per image x images per second / the
device's measured dense-matmul peak at the run's precision. The peak is measured here, not taken from
a datasheet, so MFU says how close a workload gets to what this machine really does on its best op.
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import platform
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

DTYPES = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def autocast(device: str, precision: str):
    """The autocast context a Lightning precision string stands for (fp32: none)."""
    dtype = DTYPES[precision]
    return torch.autocast(device, dtype=dtype) if dtype != torch.float32 else nullcontext()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> dict:
    """Device, host and library versions: the header of every results table."""
    import lightning

    info = {"device": torch.cuda.get_device_name(0) if device == "cuda" else f"{cpu_model()} (CPU)",
            "cpu": cpu_model(), "cpu_threads": torch.get_num_threads(), "os_cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M")}
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    return info


def matmul_peak(device: str, dtype: torch.dtype, sizes: tuple[int, ...] | None = None, seconds: float = 1.0) -> float:
    """Best measured dense matmul throughput (FLOP/s) over a few square sizes: the MFU denominator."""
    sizes = sizes or ((2048, 4096, 8192) if device == "cuda" else (1024, 2048))
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(2):
            a @ b
        sync(device)
        reps, elapsed = 0, 0.0
        t0 = time.perf_counter()
        while elapsed < seconds / len(sizes) or reps < 2:
            a @ b
            reps += 1
            if reps % 4 == 0 or device != "cuda":
                sync(device)
                elapsed = time.perf_counter() - t0
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def _flops(fn: Callable[[], None]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def training_flops_per_image(net: torch.nn.Module, forward: Callable[[torch.nn.Module, int], torch.Tensor],
                             batch: int = 2) -> int:
    """Model FLOPs of one training image (forward + backward) of `net`, counted on a CPU copy.

    forward(net, batch) -> output; its sum is back-propagated. Counting runs on a copy (in fp32 on the
    CPU), so the benchmarked net, its device and its optimizer state are untouched.
    """
    net = copy.deepcopy(net).float().cpu().train()

    def step():
        forward(net, batch).float().sum().backward()

    return _flops(step) // batch


def forward_flops_per_image(net: torch.nn.Module, forward: Callable[[torch.nn.Module, int], torch.Tensor],
                            batch: int = 2) -> int:
    """Model FLOPs of one forward pass per image (a sampling step without guidance)."""
    net = copy.deepcopy(net).float().cpu().eval()
    with torch.no_grad():
        return _flops(lambda: forward(net, batch)) // batch


def mfu(flops_per_image: float, images_per_s: float, peak: float) -> float:
    """Model FLOPs utilisation in [0, 1]: achieved model FLOP/s over the measured peak."""
    return flops_per_image * images_per_s / peak


def params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


class LoopTimer:
    """Throughput of iterations after `warmup`.

    On CUDA the device is synchronised only at the two ends (no per-step sync perturbing the pipeline)
    and the rate is items / elapsed. On the CPU every op is synchronous, so each iteration's wall time is
    known for free and the rate is items per iteration / the median iteration time: robust to the odd
    stall of a shared machine, which would otherwise swing a 10-step measurement by 10%.
    """

    def __init__(self, device: str, warmup: int):
        self.device, self.warmup = device, warmup
        self.t0 = self.t1 = None
        self.items = 0
        self.ticks: list[tuple[float, int]] = []  # (start time, items) of each timed iteration

    def tick(self, i: int, items: int) -> None:
        """Call at the start of iteration i with the items it will process."""
        if i == self.warmup:
            sync(self.device)
            self.t0 = time.perf_counter()
        if i >= self.warmup:
            self.items += items
            self.ticks.append((time.perf_counter(), items))

    def stop(self, at: float | None = None) -> None:
        """End of the last timed iteration (`at`: a perf_counter time taken then, if it was earlier)."""
        sync(self.device)
        self.t1 = time.perf_counter() if at is None else at

    @property
    def rate(self) -> float:
        if self.t0 is None or self.t1 is None:
            raise RuntimeError("LoopTimer: fewer iterations than the warm-up, nothing was timed")
        if self.device != "cpu":
            return self.items / (self.t1 - self.t0)
        ends = [t for t, _ in self.ticks[1:]] + [self.t1]
        per_item = sorted((end - start) / n for (start, n), end in zip(self.ticks, ends))
        return 1.0 / per_item[len(per_item) // 2]
