"""LR schedules against torch's own schedulers (independent implementations of the same formulas)."""

from __future__ import annotations

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, ExponentialLR, LinearLR, SequentialLR

from diffusion_lab.optim import exponential_decay, warmup_cosine

LR = 1e-3


def lrs(make, steps: int) -> list[float]:
    """The learning rate of each optimizer step, as Lightning steps the scheduler (interval: step)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("warmup, total, min_factor", [(10, 200, 0.05), (100, 1000, 0.0), (2, 50, 0.5)])
def test_warmup_cosine_equals_torch_linear_then_cosine_annealing(warmup, total, min_factor):
    ours = lrs(lambda o: warmup_cosine(o, warmup, total, min_factor), total)
    torch_lrs = lrs(lambda o: SequentialLR(o, [LinearLR(o, 1 / warmup, 1.0, warmup - 1),
                                               CosineAnnealingLR(o, total - warmup, eta_min=min_factor * LR)],
                                           [warmup]), total)
    assert ours == pytest.approx(torch_lrs, rel=1e-12, abs=1e-18)
    assert ours[0] == pytest.approx(LR / warmup) and max(ours) == pytest.approx(LR)
    # past the plan it holds at min_factor * lr, where torch's cosine is periodic and climbs back
    beyond = lrs(lambda o: warmup_cosine(o, warmup, total, min_factor), 2 * total)[total:]
    assert beyond == pytest.approx([min_factor * LR] * total, abs=1e-18)


def test_exponential_decay_equals_torch_exponential_lr():
    total = 300
    ours = lrs(lambda o: exponential_decay(o, 0.1, total), total + 1)
    torch_lrs = lrs(lambda o: ExponentialLR(o, 0.1 ** (1 / total)), total + 1)
    assert ours == pytest.approx(torch_lrs, rel=1e-12)
    assert ours[-1] == pytest.approx(0.1 * LR)  # CS180: 0.1 x lr after the planned steps
    assert lrs(lambda o: exponential_decay(o, 0.1, total), 2 * total)[-1] == pytest.approx(0.1 * LR)
