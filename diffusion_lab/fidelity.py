"""Image metrics (FID, KID, IS) through torch-fidelity's Inception-v3 and its metric functions.

Why not `torch_fidelity.calculate_metrics` end to end: we need (a) features of generated images that
are already uint8 tensors on the training device, batched there; (b) a reference-feature cache keyed
by dataset, split, resolution, extractor weights and n, read back with torch.load(weights_only=True)
(torch-fidelity's own cache unpickles arbitrary objects); (c) IS reported as unavailable, with the
reason, when the extractor's logits are not finite (the offline weights lack the fc layer). The
feature extractor and the FID/KID/IS formulas are torch-fidelity's, so the numbers equal a direct
`calculate_metrics(input1=generated, input2=reference)` call (a test checks this).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from diffusion_lab.fileio import atomic_path

log = logging.getLogger("diffusion_lab")

METRICS = ("fid", "kid", "isc")
FID_BIAS_N = 10_000  # FID is biased upward below this many samples (Chong & Forsyth 2020)


def _to_rgb_u8(x: Tensor) -> Tensor:
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 (N, 1|3, H, W), got {x.dtype} {tuple(x.shape)}")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # grey -> RGB, as torchvision does for Inception


class InceptionFeatures:
    """torch-fidelity's Inception-v3 ('inception-v3-compat'): '2048' pool features (FID/KID) and
    'logits_unbiased' (IS), run in batches on `device`. `weights`: a local .pth (offline) or None
    (torch-fidelity downloads the standard file)."""

    name = "inception-v3-compat"

    def __init__(self, weights: str | None = None, device: str | torch.device = "cpu", batch_size: int = 64):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        if weights is not None:
            weights = str(weights)
            if not Path(weights).is_file():
                raise ValueError(f"weights={weights}: file not found (expected Inception weights for "
                                 "torch-fidelity, e.g. pt_inception-2015-12-05-6726825d.pth)")
            try:  # refuse files that would run code: torch-fidelity itself loads with weights_only=False
                torch.load(weights, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise ValueError(f"weights={weights}: not a plain state_dict ({type(exc).__name__})") from exc
        self.weights, self.device, self.batch_size = weights, torch.device(device), batch_size
        self.net = FeatureExtractorInceptionV3(self.name, ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=weights).to(self.device)
        self.weights_sha256 = _state_dict_hash(self.net.state_dict())
        self.calls = 0  # images run through the network (tests check cache hits with it)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        """uint8 (N, 1|3, H, W) -> {"2048": (N, 2048), "logits_unbiased": (N, 1008)} float32 on the CPU."""
        from diffusion_lab.console import progress

        images = _to_rgb_u8(images)
        feats: dict[str, list[Tensor]] = {"2048": [], "logits_unbiased": []}
        with progress(len(images), "Inception features", unit="img") as bar:
            for i in range(0, len(images), self.batch_size):
                out = self.net(images[i: i + self.batch_size].to(self.device))
                for key, value in zip(("2048", "logits_unbiased"), out):
                    feats[key].append(value.float().cpu())
                bar.update(len(out[0]))
        self.calls += len(images)
        return {k: torch.cat(v) for k, v in feats.items()}

    def describe(self) -> dict:
        return {"feature_extractor": self.name, "weights": self.weights or "torch-fidelity download",
                "weights_sha256": self.weights_sha256}


def _state_dict_hash(state: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class ReferenceCache:
    """Reference features on disk: <dir>/<dataset>-<split>-<H>x<W>-<extractor>-<sha12>-n<n>-seed<seed>.pt."""

    def __init__(self, directory: str | Path | None):
        self.directory = None if directory is None else Path(directory)

    def key(self, dataset: str, split: str, shape: Sequence[int], extractor: InceptionFeatures, n: int,
            seed: int) -> str:
        h, w = shape[-2:]
        return f"{dataset}-{split}-{h}x{w}-{extractor.name}-{extractor.weights_sha256[:12]}-n{n}-seed{seed}"

    def get(self, key: str, compute) -> tuple[dict[str, Tensor], bool]:
        """(features, hit): read the cached file, or compute and store it atomically."""
        if self.directory is None:
            return compute(), False
        path = self.directory / f"{key}.pt"
        if path.is_file():
            try:
                return torch.load(path, map_location="cpu", weights_only=True), True
            except Exception as exc:  # a corrupt cache entry is recomputed, never trusted
                log.warning("reference cache %s unreadable (%s): recomputing", path, type(exc).__name__)
        feats = compute()
        with atomic_path(path) as tmp:
            torch.save(feats, tmp)
        return feats, False


def reference_features(extractor: InceptionFeatures, cache: ReferenceCache, datamodule, split: str,
                       n: int) -> tuple[dict[str, Tensor], str, bool]:
    """Features of n real images of `split` (a seeded subset), from the cache when present -> (features, key, hit)."""
    key = cache.key(datamodule.name, split, datamodule.shape, extractor, n, datamodule.seed)
    feats, hit = cache.get(key, lambda: extractor(datamodule.real_uint8(split, n)))
    return feats, key, hit


def fidelity_metrics(gen: dict[str, Tensor], ref: dict[str, Tensor], metrics: Sequence[str] = ("fid", "kid"),
                     kid_subsets: int = 100, kid_subset_size: int = 1000, isc_splits: int = 10,
                     rng_seed: int = 2020) -> tuple[dict[str, float], dict]:
    """FID / KID / IS from Inception features (torch-fidelity's formulas) -> (metrics, notes)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"metrics={list(metrics)}: unknown {unknown}; expected a subset of {list(METRICS)}")
    out: dict[str, float] = {}
    notes: dict = {}
    n_gen, n_ref = len(gen["2048"]), len(ref["2048"])
    if "fid" in metrics:
        stats = [fid_features_to_statistics(f["2048"]) for f in (gen, ref)]
        out["fid"] = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
        if min(n_gen, n_ref) < FID_BIAS_N:
            notes["fid_warning"] = (f"FID on {n_gen} generated / {n_ref} reference images (< {FID_BIAS_N}) is "
                                    "biased upward; compare only at equal n")
    if "kid" in metrics:
        size = min(kid_subset_size, n_gen, n_ref)  # torch-fidelity refuses subsets larger than a set
        kid = kid_features_to_metric(gen["2048"], ref["2048"], kid_subsets=kid_subsets, kid_subset_size=size,
                                     rng_seed=rng_seed, verbose=False)
        out["kid_mean"], out["kid_std"] = kid["kernel_inception_distance_mean"], kid["kernel_inception_distance_std"]
        notes["kid_subset_size"], notes["kid_subsets"] = size, kid_subsets
        if size == n_gen == n_ref:
            notes["kid_std_note"] = "every subset is the whole set (n <= kid_subset_size): kid_std is only round-off"
    if "isc" in metrics:
        logits = gen["logits_unbiased"]
        if not torch.isfinite(logits).all():
            notes["isc_unavailable"] = ("the feature extractor's logits are not finite (Inception weights "
                                        "without the fc layer): FID/KID are valid, IS is not")
        else:
            isc = isc_features_to_metric(logits, splits=isc_splits, rng_seed=rng_seed)
            out["isc_mean"], out["isc_std"] = isc["inception_score_mean"], isc["inception_score_std"]
    return out, notes
