"""`task=train_autoencoder`: the suite's KL-autoencoder for latent diffusion, and its reload (`load_autoencoder`).

Loss per image, as LDM's LPIPSWithDiscriminator divided by the pixel count D = C*H*W (so the weights keep
LDM's meaning while the loss stays O(1)):
    L1(x, x_hat) + lpips_weight * LPIPS(x, x_hat) + kl_weight * KL(q(z|x) || N(0, I)) / D  [+ GAN terms]
with KL summed over the latent of each image (LDM's 1e-6 is relative to that sum). LDM's learned scalar
log-variance on the reconstruction term is left out (it starts at 0, i.e. this loss).

The optional PatchGAN (hinge loss) starts at `disc_start`; its generator term is weighted by LDM's
adaptive weight disc_weight * |grad_last nll| / (|grad_last g| + 1e-4) on the decoder's output conv. Both
players are trained in one optimizer step: the generator sees the discriminator through detached parameters
(torch.func.functional_call) and the discriminator sees detached images, so each loss reaches only its own
parameters and Lightning's automatic optimization (precision, accumulation, clipping) still applies.
LPIPS is held outside the module tree: it is in no state_dict, optimizer or EMA, and loading the
autoencoder later needs neither it nor the discriminator.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from diffusion_lab import imageio
from diffusion_lab.build import ConfigError, build_trainer, load_task_net, make, resolved
from diffusion_lab.callbacks import EMA, MetricMonitor, SampleMonitor
from diffusion_lab.lpips import LPIPS
from diffusion_lab.nets.autoencoder import PatchDiscriminator, kl_divergence
from diffusion_lab.optim import optimizer_config
from diffusion_lab.preflight import setup_data
from diffusion_lab.report import training_facts, write_report
from diffusion_lab.spaces import file_sha256, from_uint8, to_uint8

TASK_TARGET = "diffusion_lab.autoencoder.train_autoencoder"


def _pixels(x: Tensor) -> Tensor:
    """Batches carry uint8 images (or [-1, 1] floats): the autoencoder works on [-1, 1]."""
    return from_uint8(x) if x.dtype == torch.uint8 else x


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss (Lim & Ye 2017): 0.5 (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """LDM/VQGAN's balance of the GAN term: |d nll / d W| / (|d g / d W| + 1e-4), clamped to [0, 1e4], detached."""
    g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_nll.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class AutoencoderModule(L.LightningModule):
    """Trains `net` (a KLAutoencoder) on L1 + LPIPS + KL (+ PatchGAN from `disc_start` on)."""

    def __init__(self, net: nn.Module, optimizer: Callable, lr_scheduler: Callable | None = None,
                 lpips: LPIPS | None = None, lpips_weight: float = 1.0, kl_weight: float = 1e-6,
                 disc: nn.Module | None = None, disc_start: int = 0, disc_weight: float = 0.5,
                 config: dict | None = None):
        super().__init__()
        if lpips_weight > 0 and lpips is None:
            raise ValueError(f"lpips_weight={lpips_weight}: needs an LPIPS network")
        self.net, self.disc = net, disc
        self.__dict__["lpips"] = lpips  # not a submodule: frozen, in no state_dict / optimizer / EMA
        self.lpips_weight, self.kl_weight = float(lpips_weight), float(kl_weight)
        self.disc_start, self.disc_weight = int(disc_start), float(disc_weight)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.config = config

    def on_fit_start(self) -> None:
        to_device = getattr(self.trainer.datamodule, "to_device", None)
        if to_device is not None:  # in-memory images batch on the training device
            to_device(self.device)
        if self.lpips is not None:
            self.lpips.to(self.device)

    def _gan_on(self) -> bool:
        return self.disc is not None and self.global_step >= self.disc_start

    def losses(self, x: Tensor) -> dict[str, Tensor]:
        """{"generator": the autoencoder's loss, "discriminator": the PatchGAN's (0 before disc_start), and the
        terms to log}; each of the two reaches only its own player's parameters."""
        x_hat, mean, logvar = self.net(x)
        l1 = (x_hat.float() - x.float()).abs().flatten(1).mean(1)  # (B,)
        p = self.lpips(x_hat, x).float() if self.lpips_weight > 0 else torch.zeros_like(l1)
        kl = kl_divergence(mean, logvar)  # (B,) summed over each latent
        nll = (l1 + self.lpips_weight * p).mean()
        out = {"generator": nll + self.kl_weight * kl.mean() / x[0].numel(), "discriminator": torch.zeros_like(nll),
               "l1": l1.mean(), "lpips": p.mean(), "kl": kl.mean()}
        if self._gan_on():
            frozen = {k: v.detach() for k, v in [*self.disc.named_parameters(), *self.disc.named_buffers()]}
            g_loss = -functional_call(self.disc, frozen, (x_hat,)).float().mean()
            weight = self.disc_weight * adaptive_weight(nll, g_loss, self.net.last_layer())
            out["generator"] = out["generator"] + weight * g_loss
            out["discriminator"] = hinge_d_loss(self.disc(x.detach()).float(), self.disc(x_hat.detach()).float())
            out |= {"g_loss": g_loss, "d_weight": weight}
        return out

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self.losses(_pixels(batch["x"]))
        loss = out.pop("generator") + out["discriminator"]
        if not self._gan_on():
            out.pop("discriminator")
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{'d_loss' if k == 'discriminator' else k}": v.detach() for k, v in out.items()})
        return loss

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = _pixels(batch["x"])
        x_hat = self.net.decode(self.net.encode(x)[0])
        mse = (to_uint8(x_hat).float() / 255 - to_uint8(x).float() / 255).pow(2).flatten(1).mean(1)
        self.log("val/l1", (x_hat.float() - x).abs().mean(), batch_size=len(x))
        self.log("val/psnr", (-10 * torch.log10(mse.clamp_min(1e-10))).mean(), batch_size=len(x), prog_bar=True)

    def configure_optimizers(self):
        groups = [{"params": list(self.net.parameters())}]
        if self.disc is not None:
            groups.append({"params": list(self.disc.parameters())})
        return optimizer_config(groups, self.optimizer_factory, self.lr_scheduler_factory)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["config"] = self.config


def load_autoencoder(path: str | Path, key: str = "ckpt", use_ema: bool = True) -> tuple[nn.Module, dict]:
    """A train_autoencoder checkpoint -> (frozen KLAutoencoder in eval mode on the CPU, info with path, sha256 of
    the file, step and the `autoencoder` config node). weights_only + allow-listed config: no code runs."""
    net, cfg, ckpt = load_task_net(path, key, TASK_TARGET, "autoencoder", "an autoencoder", use_ema)
    info = {"path": str(Path(path).resolve()), "sha256": file_sha256(path), "step": ckpt.get("global_step"),
            "config": OmegaConf.to_container(cfg.autoencoder, resolve=True)}
    return net, info


@torch.no_grad()
def reconstruct(net: nn.Module, x_u8: Tensor, device: torch.device, batch_size: int = 256) -> Tensor:
    """uint8 images -> uint8 reconstructions through the posterior mean (the deterministic encoding)."""
    out = []
    for i in range(0, len(x_u8), batch_size):
        mean, _ = net.encode(from_uint8(x_u8[i: i + batch_size].to(device)))
        out.append(to_uint8(net.decode(mean)).cpu())
    return torch.cat(out)


@torch.no_grad()
def pair_metrics(real_u8: Tensor, recon_u8: Tensor, lpips: LPIPS, device: torch.device,
                 batch_size: int = 256) -> dict[str, float]:
    """Mean over images of per-image PSNR and SSIM (torchmetrics, [0, 1] data range) and LPIPS."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    psnr, ssim, dist = [], [], []
    for i in range(0, len(real_u8), batch_size):
        a, b = real_u8[i: i + batch_size].to(device), recon_u8[i: i + batch_size].to(device)
        af, bf = a.float() / 255, b.float() / 255
        psnr.append(peak_signal_noise_ratio(bf, af, data_range=1.0, reduction="none", dim=(1, 2, 3)).cpu())
        ssim.append(structural_similarity_index_measure(bf, af, data_range=1.0, reduction="none").cpu())
        dist.append(lpips(from_uint8(b), from_uint8(a)).float().cpu())
    return {name: float(torch.cat(v).mean()) for name, v in (("psnr", psnr), ("ssim", ssim), ("lpips", dist))}


def reconstruction_fid(net: nn.Module, datamodule, split: str, n: int | None, cfg: DictConfig, device,
                       batch_size: int = 256) -> tuple[dict, dict]:
    """rFID: FID between n held-out images (a seeded subset) and their own reconstructions (torch-fidelity
    Inception; the originals' features come from the suite's reference cache, keyed like evaluation's)."""
    from diffusion_lab.fidelity import InceptionFeatures, ReferenceCache, fidelity_metrics, reference_features

    fc = cfg.eval.fidelity
    try:
        extractor = InceptionFeatures(fc.get("weights"), device, int(fc.batch_size))
    except ValueError as exc:
        raise ConfigError(f"eval.fidelity.{exc}") from exc
    real = datamodule.real_uint8(split, n)
    ref, key, hit = reference_features(extractor, ReferenceCache(fc.get("cache_dir")), datamodule, split, len(real))
    values, notes = fidelity_metrics(extractor(reconstruct(net, real, device, batch_size)), ref, ["fid"])
    return {"rfid": values["fid"]}, {"n": len(real), "split": split, "subset_seed": datamodule.seed,
                                     **extractor.describe(), "reference_cache_key": key,
                                     "reference_cache_hit": hit, **notes}


def save_pairs(real_u8: Tensor, recon_u8: Tensor, path: Path, per_row: int = 8, rows: int = 4) -> None:
    """A grid of `rows` pairs of rows: originals above, their reconstructions below."""
    parts = []
    for r in range(min(rows, (len(real_u8) + per_row - 1) // per_row)):
        sl = slice(r * per_row, (r + 1) * per_row)
        parts += [real_u8[sl], recon_u8[sl]]
    imageio.save_grid(torch.cat(parts), path, nrow=per_row)


def _build(cfg: DictConfig, datamodule, lpips_weight, kl_weight, disc_start, disc_weight, disc_ch, disc_layers):
    """The autoencoder (checked against the data), LPIPS and the optional discriminator -> the module."""
    net = make(cfg, "autoencoder")
    shape = tuple(datamodule.shape)
    if (net.in_channels, net.image_size, net.image_size) != shape:
        raise ConfigError(f"autoencoder: in_channels={net.in_channels}, image_size={net.image_size} do not fit the "
                          f"data {datamodule.name} {list(shape)}")
    lpips = LPIPS(cfg.lpips.net, cfg.lpips.get("weights"))  # also the held-out metric, so always built
    try:
        disc = None if disc_start is None else PatchDiscriminator(shape[0], disc_ch, disc_layers)
    except ValueError as exc:
        raise ConfigError(f"task.disc_{exc}") from exc
    return AutoencoderModule(net, make(cfg, "optimizer"), make(cfg, "lr_scheduler", optional=True), lpips,
                             lpips_weight, kl_weight, disc, disc_start or 0, disc_weight, config=resolved(cfg))


def train_autoencoder(cfg: DictConfig, run_dir: Path, lpips_weight: float = 1.0, kl_weight: float = 1e-6,
                      disc_start: int | None = None, disc_weight: float = 0.5, disc_ch: int = 64, disc_layers: int = 3,
                      eval_split: str = "test", eval_n: int | None = None, eval_batch_size: int = 256,
                      rfid: bool = True, rfid_n: int | None = None) -> dict:
    """Fit the `autoencoder` net on the run's images, then score reconstructions of held-out images:
    PSNR, SSIM, LPIPS and rFID, with the grid of originals vs reconstructions."""
    from diffusion_lab.tasks import _log_final, _resume_path, _save_loss_curve, _save_resolved_config, write_json

    t0 = time.perf_counter()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if OmegaConf.select(cfg, "autoencoder") is None:
        raise ConfigError("autoencoder=null: task=train_autoencoder needs a net (autoencoder=kl_mnist|kl_f4|kl_f8)")
    weights = OmegaConf.select(cfg, "eval.fidelity.weights")
    if rfid and weights and not Path(weights).is_file():
        raise ConfigError(f"eval.fidelity.weights={weights}: file not found (expected Inception weights for rFID)")
    datamodule = make(cfg, "data")
    if not hasattr(datamodule, "real_uint8"):
        raise ConfigError(f"data: {getattr(datamodule, 'name', 'this dataset')} is not images; "
                          "task=train_autoencoder needs image data")
    module = _build(cfg, datamodule, lpips_weight, kl_weight, disc_start, disc_weight, disc_ch, disc_layers)
    setup_data(cfg, datamodule)  # missing or unreadable files: one line
    try:  # the held-out images, before any training: a missing split must not cost a run
        real = datamodule.real_uint8(eval_split, eval_n)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"task.eval_split={eval_split}: {str(exc).splitlines()[0]}") from exc
    _save_resolved_config(cfg, run_dir)
    trainer = build_trainer(cfg, run_dir, exclude=(SampleMonitor, MetricMonitor))
    t_fit = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=_resume_path(cfg, run_dir))
    train_seconds = time.perf_counter() - t_fit
    for callback in trainer.callbacks:
        if isinstance(callback, EMA):
            callback.use_average(module)
    if not trainer.is_global_zero:  # DDP: rank 0 evaluates and writes
        return {"metrics": {}}
    _save_loss_curve(run_dir, trainer)

    net, device = module.net.eval(), module.device
    t_eval = time.perf_counter()
    recon = reconstruct(net, real, device, eval_batch_size)
    metrics = pair_metrics(real, recon, module.lpips.to(device), device, eval_batch_size)
    fid_protocol = {}
    if rfid:
        values, fid_protocol = reconstruction_fid(net, datamodule, eval_split, rfid_n, cfg, device, eval_batch_size)
        metrics |= values
    save_pairs(real, recon, run_dir / "reconstructions.png")
    uses_ema = any(isinstance(c, EMA) for c in trainer.callbacks)
    protocol = {
        "task": "train_autoencoder", "checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
        "step": trainer.global_step, "ema": uses_ema, "seed": int(cfg.seed),
        "autoencoder": {"parameters": sum(p.numel() for p in net.parameters()), "factor": net.factor,
                        "latent_shape": list(net.latent_shape)},
        "loss": {"l1": 1.0, "lpips_weight": lpips_weight, "kl_weight": kl_weight, "kl": "summed per image / D",
                 "disc_start": disc_start, "disc_weight": disc_weight if disc_start is not None else None},
        "heldout": {"dataset": datamodule.name, "split": eval_split, "n": len(real), "subset_seed": datamodule.seed,
                    "encoding": "posterior mean, decoded, quantised to uint8"},
        "psnr": "per-image PSNR (dB) of uint8 reconstructions vs originals in [0, 1] (torchmetrics), mean",
        "ssim": "per-image SSIM, Gaussian 11x11 sigma 1.5, data range 1 (torchmetrics), mean",
        **module.lpips.describe(),
        **({"rfid": {"compares": "reconstructions vs their own originals", **fid_protocol}} if rfid else {}),
        "metric_seconds": round(time.perf_counter() - t_eval, 2), "train_seconds": round(train_seconds, 2),
        "wall_seconds": round(time.perf_counter() - t0, 2), "data": datamodule.describe()}
    results = {"metrics": metrics, "protocol": protocol}
    write_json(run_dir / "results.json", results)
    _log_final(trainer, results, run_dir)
    facts = training_facts(trainer, net, int(cfg.data.batch_size), train_seconds, run_dir)
    write_report(run_dir, f"{cfg.get('name', 'autoencoder')}: autoencoder training report", facts, results,
                 {"Loss curve": "loss_curve.png",
                  "Held-out originals (upper row of each pair) and reconstructions (lower)": "reconstructions.png"})
    return results
