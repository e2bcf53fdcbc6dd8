"""Evaluation inputs checked up front, and the class judge.

`tasks.generate_and_evaluate` draws the samples; the data's domain (domains.py) saves, draws and scores them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.build import ConfigError
from diffusion_lab.classifier import load_classifier
from diffusion_lab.fidelity import METRICS


def check_eval_inputs(ev: DictConfig) -> None:
    """eval.metrics names, the Inception weights file and the judge checkpoint, checked up front."""
    wanted = list(ev.get("metrics") or [])
    bad = [m for m in wanted if m not in METRICS]
    if bad:
        raise ConfigError(f"eval.metrics={wanted}: unknown {bad}; expected a subset of {list(METRICS)}")
    weights = OmegaConf.select(ev, "fidelity.weights")
    if wanted and weights and not Path(weights).is_file():
        raise ConfigError(f"eval.fidelity.weights={weights}: file not found (expected Inception weights for "
                          "torch-fidelity, or null to download them)")
    if ev.get("judge"):
        if ev.get("classes") is None:
            raise ConfigError(f"eval.judge={ev.judge}: judging needs class requests (eval.classes=all or a list)")
        load_classifier(ev.judge, key="eval.judge")  # a classifier checkpoint, with an allow-listed config


def check_judge(ev: DictConfig, data_shape: tuple[int, ...]) -> None:
    """The judge classifies decoded samples, so it must take items of the data's shape (a 28x28 MNIST judge
    cannot score 32x32 padded digits): one dry forward, one line, before any training or sampling."""
    if not ev.get("judge"):
        return
    net, _ = load_classifier(ev.judge, key="eval.judge")
    try:
        with torch.no_grad():
            net(torch.zeros(1, *data_shape), torch.zeros(1))
    except (ValueError, RuntimeError) as exc:
        msg = next(iter(str(exc).strip().splitlines()), type(exc).__name__)
        raise ConfigError(f"eval.judge={ev.judge}: does not take this data's items of shape {tuple(data_shape)} "
                          f"({msg}); train a judge on the same data settings") from exc


def judge_metrics(samples: torch.Tensor, labels: torch.Tensor | None, judge: str, names: list[str],
                  datamodule=None) -> tuple[dict, dict]:
    """A clean classifier checkpoint (eval.judge) on the class-requested samples: accuracy per class and,
    with image data, the Fréchet distance between its features of the samples and of as many real
    test images (a cheap CPU stand-in for FID on MNIST)."""
    if labels is None or not bool((labels >= 0).any()):
        raise ConfigError(f"eval.judge={judge}: judging needs class requests (eval.classes=all or a list)")
    net, info = load_classifier(judge, key="eval.judge")
    keep = labels >= 0
    x, want = samples[keep], labels[keep]

    @torch.no_grad()
    def features(batch):
        return torch.cat([net.features(b, torch.zeros(len(b))) for b in batch.split(1024)])

    f_gen = features(x)
    pred = net.head(f_gen).argmax(1)
    out = {"judge_accuracy": float((pred == want).float().mean())}
    for c in want.unique().tolist():
        out[f"judge_accuracy/{names[c] if c < len(names) else c}"] = float((pred[want == c] == c).float().mean())
    protocol = {"judge": str(judge), "judge_step": info["step"]}
    real = None if datamodule is None else datamodule.domain.judge_reference(datamodule, len(x))
    if real is not None:
        from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

        stats = [fid_features_to_statistics(f.float()) for f in (f_gen, features(real))]
        out["judge_fd"] = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
        protocol["judge_fd"] = (f"Fréchet distance of the judge's penultimate features: {len(x)} samples vs "
                                f"{len(real)} real test images")
    return out, protocol
