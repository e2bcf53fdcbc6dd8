"""CS180 part 1: the one-step denoiser's task and figures (noising process, epochs, OOD sigma sweep)."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from diffusion_lab import imageio
from diffusion_lab.report import training_facts, write_report

SIGMAS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)


def _test_images(module, datamodule, n: int) -> torch.Tensor:
    """n seeded test images in the module's (pixel) space."""
    return module.space.encode(datamodule.real_uint8("test", n=n)).cpu()


@torch.no_grad()
def denoise_rows(module, x0: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """Rows clean / noisy / denoised for a batch of test images (one fixed noise draw)."""
    g = torch.Generator().manual_seed(seed)
    noisy = x0 + sigma * torch.randn(x0.shape, generator=g)
    module.net.eval()
    out = module.objective.denoise(module.net, noisy.to(module.device), sigma).float().cpu()
    return torch.cat([x0, noisy, out])


class DenoiserFigures(L.Callback):
    """After the listed (1-based) epochs: clean / noisy (sigma) / denoised test digits."""

    def __init__(self, at_epochs: list[int] = (1, 5), n: int = 8):
        self.at_epochs, self.n = set(at_epochs), n

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        if epoch in self.at_epochs and trainer.is_global_zero:
            x0 = _test_images(pl_module, trainer.datamodule, self.n)
            rows = denoise_rows(pl_module, x0, pl_module.objective.sigma)
            imageio.save_grid(rows, Path(trainer.default_root_dir) / f"denoised_epoch_{epoch:03d}.png", nrow=self.n)
            pl_module.net.train()


def train_denoiser(cfg: DictConfig, run_dir: Path) -> dict:
    """Fit the one-step denoiser; write the CS180 part-1 figures and test MSE per sigma to results.json."""
    from diffusion_lab.tasks import fit, train_compute, write_json

    t0 = time.perf_counter()
    parts, trainer, train_seconds = fit(cfg, run_dir)
    module, dm = parts.module, parts.datamodule
    x0 = _test_images(module, dm, 8)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(x0.shape, generator=g)
    imageio.save_grid(torch.cat([x0 + s * eps for s in SIGMAS]), run_dir / "noising_process.png", nrow=8)
    one = x0[:1]  # the out-of-distribution sweep on one fixed image
    sweep = [denoise_rows(module, one, s, seed=1) for s in SIGMAS]
    imageio.save_grid(torch.cat([r[1:2] for r in sweep] + [r[2:3] for r in sweep]), run_dir / "ood_sigma_sweep.png",
                      nrow=len(SIGMAS))
    test = _test_images(module, dm, 1000)
    mse = {f"test_mse_sigma_{s}": float(((denoise_rows(module, test, s, seed=2)[2000:] - test) ** 2).mean())
           for s in SIGMAS}
    results = {"metrics": mse, "protocol": {"task": "train_denoiser", "objective": module.objective.describe(),
                                            "step": trainer.global_step, "n_test": len(test),
                                            "wall_seconds": round(time.perf_counter() - t0, 2),
                                            "data": dm.describe(), "ema": False,
                                            "backbone": type(module.net).__name__,
                                            "compute": train_compute(module, trainer)}}
    write_json(run_dir / "results.json", results)
    facts = training_facts(trainer, module.net, int(cfg.data.batch_size), train_seconds, run_dir,
                           results["protocol"]["compute"])
    write_report(run_dir, f"{cfg.get('name', 'denoiser')}: one-step denoiser report", facts, results,
                 {"Loss curve": "loss_curve.png", "Noising process": "noising_process.png",
                  "Denoised test digits (last epoch)": f"denoised_epoch_{int(trainer.current_epoch):03d}.png",
                  "Out-of-distribution sigma sweep": "ood_sigma_sweep.png"})
    return results
