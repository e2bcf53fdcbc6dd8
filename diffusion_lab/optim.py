"""Learning-rate schedules as LambdaLR factories (config: lr_scheduler/*.yaml, _partial_).

Why not torch's own LinearLR -> CosineAnnealingLR via SequentialLR, and ExponentialLR: within the planned
steps they give the same learning rates (tests/test_optim.py compares the sequences, equal to 1e-12), but
(a) past `total_steps` (a trainer.max_time run, a resumed run given more steps) CosineAnnealingLR is periodic
and climbs back to the peak and ExponentialLR keeps decaying, where these hold at the final value; (b) every
checkpoint written so far stores a LambdaLR state, which SequentialLR.load_state_dict cannot read, so resuming
those runs would fail. One closed-form factor per step is also the formula as the papers write it.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(optimizer: Optimizer, warmup_steps: int = 0, total_steps: int = 1000,
                  min_factor: float = 0.0) -> LambdaLR:
    """Linear warm-up over warmup_steps, then cosine decay (Loshchilov & Hutter 2017) to min_factor * lr."""
    if warmup_steps < 0 or total_steps < 1 or not 0 <= min_factor <= 1:
        raise ValueError(f"warmup_steps={warmup_steps}, total_steps={total_steps}, min_factor={min_factor}: "
                         "expected >= 0, >= 1 and in [0, 1]")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def exponential_decay(optimizer: Optimizer, final_factor: float = 0.1, total_steps: int = 1000) -> LambdaLR:
    """lr * final_factor^(step / total_steps): CS180's ExponentialLR(gamma=0.1^(1/epochs)), smoothed per step."""
    if not 0 < final_factor <= 1 or total_steps < 1:
        raise ValueError(f"final_factor={final_factor}, total_steps={total_steps}: expected (0, 1] and >= 1")
    return LambdaLR(optimizer, lambda step: final_factor ** (min(step, total_steps) / total_steps))


def optimizer_config(params, optimizer_factory, lr_scheduler_factory=None):
    """What a LightningModule's configure_optimizers returns: the optimizer, plus its LR schedule stepped
    every optimizer step when one is configured."""
    opt = optimizer_factory(params)
    if lr_scheduler_factory is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": lr_scheduler_factory(opt), "interval": "step"}}
