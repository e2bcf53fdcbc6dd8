"""Use a trained checkpoint from Python: load, sample, denoise, evaluate (README "Use from Python").

    python docs/use_from_python.py outputs/states/<time>/checkpoints/last.ckpt [out_dir] [n]

Works for any task=train checkpoint (points or images, unconditional or class-conditional); the same lines run in a
notebook. Writes <out_dir>/api_samples.png and task=sample's files under <out_dir>/evaluate; tests/test_api.py runs
it on a tiny checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a script: no display needed (a notebook shows the figure inline instead)
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

import diffusion_lab  # noqa: E402
from diffusion_lab.lit import DiffusionModule  # noqa: E402


def main(ckpt: str, out_dir: str = "use_from_python", n: int = 500) -> dict:
    n, out = int(n), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # The checkpoint's own config and EMA weights, on the GPU when there is one.
    model = diffusion_lab.load(ckpt)
    print(model)

    # task=sample's defaults (the checkpoint's sampler, seed 0): the same tensor `task=sample` saves in samples.pt.
    x = model.sample(n, seed=0)
    # Any sampler of conf/sampler with its options, e.g. deterministic DDIM in 50 steps.
    x_ddim = model.sample(n, sampler="ddim", steps=50, eta=0.0, seed=0)
    panels = {"checkpoint's sampler": x, "DDIM, 50 steps": x_ddim}
    # Class-conditional checkpoints: n per class (class by class), classifier-free guidance at any scale.
    if model.module.num_classes:
        x_cls, labels = model.sample(n // 5, classes="all", guidance=3.0, seed=0, return_labels=True)
        panels["every class, CFG 3"] = x_cls
        print("per-class samples:", tuple(x_cls.shape), "labels", labels.unique().tolist())

    # The one denoiser contract in model space: denoise(xt, t) -> (x0_hat, eps_hat), t = 0 data, t = 1 noise.
    x0 = model.space.encode(x[:8].to(model.device))
    t = torch.full((len(x0),), 0.5, device=model.device)
    alpha, sigma = model.module.objective.schedule.alpha_sigma(t)
    alpha, sigma = alpha.view(-1, *[1] * (x0.ndim - 1)), sigma.view(-1, *[1] * (x0.ndim - 1))
    xt = alpha * x0 + sigma * torch.randn_like(x0)
    x0_hat, eps_hat = model.denoise(xt, t)
    print("denoise at t=0.5: |x0_hat - x0| =", f"{(x0_hat - x0).abs().mean():.4f}",
          "| xt - (alpha x0_hat + sigma eps_hat) =", f"{(xt - alpha * x0_hat - sigma * eps_hat).abs().max():.2e}")

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for ax, (title, samples) in zip(axes, panels.items()):
        if samples.ndim == 2:  # points: a scatter of the first two coordinates
            ax.scatter(samples[:, 0], samples[:, 1], s=2)
        else:  # images in [-1, 1]: a grid
            ax.imshow(make_grid((samples[:64] + 1) / 2, nrow=8).clamp(0, 1).permute(1, 2, 0))
            ax.axis("off")
        ax.set_title(title)
    fig.savefig(out / "api_samples.png", dpi=100, bbox_inches="tight")

    # task=sample's whole evaluation: samples files, plots, metrics, results.json with its protocol.
    results = model.evaluate(out / "evaluate", n_samples=n, seed=0)
    print("metrics:", {k: round(v, 4) for k, v in results["metrics"].items() if isinstance(v, float)})

    # Lightning's own loader works too (the same model, as a LightningModule in eval mode).
    module = DiffusionModule.load_from_checkpoint(ckpt)
    print("load_from_checkpoint:", type(module.net).__name__, "num_classes", module.num_classes)
    return results


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3, 4):
        sys.exit("usage: python docs/use_from_python.py <checkpoint.ckpt> [out_dir] [n]")
    main(*sys.argv[1:])
