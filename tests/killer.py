"""Test-only callback (tests/ is put on PYTHONPATH by the kill tests): SIGKILLs its own process at an exact
point, once; the marker file makes the same command a plain run afterwards (same config: the resume)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L


class Kill(L.Callback):
    """at="between": at `step`, after the step file is written and before last.ckpt (the second checkpoint
    dump of that step). at="sampling": at sampler step 3 of the final sampling, after training ended."""

    def __init__(self, marker: str, at: str = "between", step: int = 30):
        self.marker, self.at, self.step, self.dumps = Path(marker), at, step, 0

    def _die(self) -> None:
        if not self.marker.exists():
            self.marker.write_text(self.at)
            os.kill(os.getpid(), signal.SIGKILL)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.at == "between" and trainer.global_step == self.step:
            self.dumps += 1
            if self.dumps == 2:
                self._die()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at != "sampling" or self.marker.exists():
            return
        sample_sharded = pl_module.sample_sharded  # the final sampling's entry point (tasks.generate_and_evaluate)

        def killing(*args, **kwargs):
            kwargs["callback"] = lambda i, t, x: self._die() if i == 3 else None
            return sample_sharded(*args, **kwargs)

        pl_module.sample_sharded = killing


class Raise(L.Callback):
    """Raises RuntimeError after training step `step`: a run that fails after it claimed its dir."""

    def __init__(self, step: int = 3):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"test failure at step {self.step}")
