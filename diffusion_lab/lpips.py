"""LPIPS (Zhang et al. 2018), v0.1 linear layers on an AlexNet or VGG16 trunk, usable offline.

The network is torchmetrics' (`_NoTrainLpips`, the module behind LearnedPerceptualImagePatchSimilarity), so
the distances are torchmetrics'. torchmetrics always fetches the trunk through torchvision's pretrained
weights, i.e. a download into the user's torch hub cache. With `weights` set (a features state_dict, or a
folder holding `alexnet_features.pth` / `vgg16_features.pth`) the trunk is built random instead and the file
is loaded into it: no download, and no hub cache or TORCH_HOME of the user is touched. Without it, the
normal torchvision download runs. The linear layers ship inside torchmetrics.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from diffusion_lab.errors import ConfigError

TRUNKS = {"alex": "alexnet_features.pth", "vgg": "vgg16_features.pth"}
HINT = "set lpips.weights (or DIFFUSION_LAB_LPIPS) to a folder holding alexnet_features.pth / vgg16_features.pth"


def weights_file(weights: str | Path, net: str) -> Path:
    """The trunk file for `net`: `weights` itself, or <weights>/<trunk>_features.pth when it is a folder."""
    path = Path(weights)
    if path.is_dir():
        path = path / TRUNKS[net]
    if not path.is_file():
        raise ConfigError(f"lpips.weights={weights}: {path} not found (expected a torchvision "
                          f"{TRUNKS[net].split('_')[0]}().features state_dict; {HINT})")
    return path


class LPIPS(nn.Module):
    """Frozen perceptual distance d(x, y) -> (B,), inputs in [-1, 1] (1-channel images are repeated to RGB).

    Differentiable in its inputs (an autoencoder loss), never trained: parameters have requires_grad=False
    and the net stays in eval mode (torchmetrics' wrapper ignores .train())."""

    def __init__(self, net: str = "alex", weights: str | Path | None = None):
        super().__init__()
        from torchmetrics.functional.image.lpips import _NoTrainLpips

        if net not in TRUNKS:
            raise ConfigError(f"lpips.net={net}: expected one of {sorted(TRUNKS)}")
        self.net_type = net
        self.weights = None if weights is None else weights_file(weights, net)
        try:
            self.net = _NoTrainLpips(net=net, pnet_rand=self.weights is not None)
        except Exception as exc:  # the torchvision download failed (offline) or the hub file is corrupt
            first = next(iter(str(exc).strip().splitlines()), type(exc).__name__)[:200]
            raise ConfigError(f"lpips.weights=null: the {net} trunk could not be fetched ({first}); {HINT}") from exc
        if self.weights is not None:
            self._load_trunk(self.weights)
        self.requires_grad_(False)

    def _load_trunk(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ConfigError(f"lpips.weights={path}: not a plain state_dict ({type(exc).__name__})") from exc
        # torchmetrics splits torchvision's `features` Sequential into slice1..slice5, keeping each layer's
        # index as its name: route "3.weight" to the slice that holds layer 3.
        owner = {name: slice_name for slice_name, part in self.net.net.named_children()
                 for name, _ in part.named_children()}
        expected = {k: v.shape for k, v in self.net.net.state_dict().items()}
        if not isinstance(state, dict) or any(k.split(".")[0] not in owner for k in state):
            raise ConfigError(f"lpips.weights={path}: keys do not match torchvision's {TRUNKS[self.net_type]} "
                              f"layers ({HINT})")
        mapped = {f"{owner[k.split('.')[0]]}.{k}": v for k, v in state.items()}
        bad = sorted(set(expected) ^ set(mapped)) or [k for k in expected if mapped[k].shape != expected[k]]
        if bad:
            raise ConfigError(f"lpips.weights={path}: not the {self.net_type} trunk (mismatch at {bad[0]})")
        self.net.net.load_state_dict(mapped)

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # dropout in the linear layers stays off

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """(B,) distances between x and y, both (B, 1|3, H, W) in [-1, 1]."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS needs two (B, 1|3, H, W) images of one shape, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        return self.net(x, y).flatten()

    def describe(self) -> dict:
        return {"lpips_net": f"v0.1 linear layers (torchmetrics), {self.net_type} trunk",
                "lpips_weights": str(self.weights) if self.weights else "torchvision download"}
