"""Compute accounting (protocol["compute"]): parameters, FLOPs per forward, training and sampling FLOPs.

Comparisons across backbones and spaces (pixel vs latent, U-Net vs DiT) are only fair at equal compute, so
every run states what it spent. Convention, as in the DiT paper and fvcore: **one multiply-add = one FLOP**.
torch.utils.flop_counter.FlopCounterMode counts 2 per multiply-add (mm/conv/attention only: norms,
activations and embeddings are free, as in those counts), so its totals are halved here.

    forward   F = FLOPs of one denoiser forward of one sample (batch 1, a label when the net is conditional)
    training  3 F x samples seen       (backward ~ 2 forwards: Kaplan et al. 2020's 6N rule per sample)
    sampling  n x NFE x (F x cfg + G) + n x decode     cfg = 2 when CFG batches cond + uncond, G = the
              classifier's forward + input gradient per evaluation under classifier guidance

Excluded (and said so in the README): validation losses, in-training sample previews, the autoencoder's
own training and its encoder passes during training (a latent cache pays those once).
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from diffusion_lab.guidance import ClassifierFree, ClassifierGuidance

COUNTER = "torch.utils.flop_counter; 1 multiply-add = 1 FLOP"
aten = torch.ops.aten


def _cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # torch registers FLOP formulas for the CUDA attention kernels only; on the CPU
    # F.scaled_dot_product_attention runs this kernel and would count as 0. Same maths, same formula.
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_MAPPING = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention}


class _TotalOnly:
    """Stands in for FlopCounterMode's per-module tracker: only the total is needed here, and the tracker's
    backward hooks break autograd.grad through a leaf input (pytorch/pytorch#131753, open), which is exactly
    classifier guidance's gradient step."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def count_flops(fn, *args, **kwargs) -> int:
    """Multiply-adds of everything fn(*args, **kwargs) runs (FlopCounterMode's 2 x MAC count, halved)."""
    counter = FlopCounterMode(display=False, custom_mapping=_MAPPING)
    counter.mod_tracker = _TotalOnly()
    with counter:
        fn(*args, **kwargs)
    return counter.get_total_flops() // 2


def _device(module: nn.Module, device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def forward_flops(net: nn.Module, shape, num_classes: int = 0, device=None) -> int:
    """FLOPs (multiply-adds) of one forward of one sample of model-space `shape`, t = 0.5, label 0 when the net
    is conditional; fp32 (autocast off), no grad, eval mode (restored after)."""
    device = _device(net, device)
    x = torch.zeros((1, *shape), device=device)
    t = torch.full((1,), 0.5, device=device)
    cond = torch.zeros(1, dtype=torch.long, device=device) if num_classes else None
    modes = {m: m.training for m in net.modules()}  # per module: a net may keep frozen parts in eval mode
    net.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            return count_flops(net, x, t, cond)
    finally:
        for m, mode in modes.items():
            m.training = mode


def decode_flops(space, device=None) -> int:
    """FLOPs of decoding one model-space sample to data: 0 for pixels and points (a fixed map), the frozen
    decoder's forward for latent spaces."""
    net = getattr(space, "net", None)
    if net is None:
        return 0
    device = _device(net, device)
    with torch.autocast(device.type, enabled=False):
        return count_flops(space.decode, torch.zeros((1, *space.shape), device=device))


def encode_flops(space, device=None) -> int:
    """FLOPs of encoding one data item to the model space (the frozen encoder; 0 for pixels and points)."""
    net = getattr(space, "net", None)
    if net is None:
        return 0
    device = _device(net, device)
    x = torch.zeros((1, *space.data_shape), device=device)
    # the encoder hook itself: space.posterior would also bump the space's images_encoded counter
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        return count_flops(space._encode_raw, x)


def guidance_flops(guidance, shape, device) -> int:
    """Extra FLOPs per net evaluation per sample of classifier guidance: the classifier's forward and its input
    gradient, counted by running exactly that (samplers.classifier_guided). 0 for no guidance and for CFG, whose
    cost is `cfg_factor`."""
    if not isinstance(guidance, ClassifierGuidance):
        return 0
    classifier = guidance.classifier

    def step():
        x = torch.zeros((1, *shape), device=device, requires_grad=True)
        logp = torch.log_softmax(classifier(x, torch.full((1,), 0.5, device=device)).float(), dim=-1)
        torch.autograd.grad(logp[:, 0].sum(), x)

    with torch.enable_grad(), torch.autocast(torch.device(device).type, enabled=False):
        return count_flops(step)


def cfg_factor(guidance, labelled: bool) -> int:
    """2 when classifier-free guidance batches the conditional and unconditional branch (samplers.guided_net
    does when labels are given and scale != 1), else 1."""
    return 2 if isinstance(guidance, ClassifierFree) and labelled and guidance.scale != 1.0 else 1


def parameters(net: nn.Module) -> dict:
    """All parameters of the denoiser; the trainable count too when some are frozen."""
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return {"parameters": total, **({"trainable_parameters": trainable} if trainable != total else {})}


def train_flops(forward: int, samples_seen: int) -> int:
    """3 x forward x samples: forward + backward (~ 2 forwards, Kaplan et al. 2020)."""
    return 3 * int(forward) * int(samples_seen)


def sampling_flops(forward: int, nfe: int, n_samples: int, cfg: int = 1, guidance: int = 0,
                   decode: int = 0) -> int:
    """n x NFE x (forward x cfg + guidance) + n x decode."""
    return int(n_samples) * (int(nfe) * (int(forward) * int(cfg) + int(guidance)) + int(decode))


def trainer_scale(trainer) -> tuple[int, int, str]:
    """(devices across nodes, gradient accumulation, accelerator name) of a Lightning trainer."""
    devices = max(1, int(getattr(trainer, "num_devices", 1) or 1)) * max(1, int(getattr(trainer, "num_nodes", 1) or 1))
    accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
    accelerator = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
    return devices, accumulate, accelerator


class TrainingLedger:
    """The training compute a checkpoint carries: samples seen (counted per step, so short last batches and
    small datasets count what they really fed) and training wall time, both summed over every launch that
    resumed the run, so FLOPs and device-hours survive preemption."""

    def __init__(self):
        self.samples_before, self.seconds_before = 0, 0.0  # earlier launches (from the checkpoint)
        self.local = 0  # samples this process fed since the launch (one rank's share under DDP)
        self.started = None

    def count(self, n: int) -> None:
        self.local += int(n)

    def samples(self, world_size: int = 1) -> int:
        return self.samples_before + self.local * max(1, int(world_size))

    def start(self) -> None:
        self.started = time.perf_counter()

    def stop(self) -> None:
        self.seconds_before, self.started = self.seconds(), None

    def seconds(self) -> float:
        return self.seconds_before + (time.perf_counter() - self.started if self.started is not None else 0.0)

    def state(self, trainer) -> dict:
        devices, _, accelerator = trainer_scale(trainer)
        return {"samples_seen": self.samples(trainer.world_size), "train_seconds": round(self.seconds(), 3),
                "devices": devices, "accelerator": accelerator}

    def load(self, state: dict | None) -> None:
        state = state or {}
        self.samples_before = int(state.get("samples_seen", 0))
        self.seconds_before = float(state.get("train_seconds", 0.0))
        self.local = 0


def training(net: nn.Module, forward: int, step: int, samples_seen: int, seconds: float | None = None,
             devices: int = 1, accelerator: str | None = None) -> dict:
    """The training half of protocol["compute"]: parameters, FLOPs per forward, samples seen, training FLOPs and,
    when the training time is known, device-hours (gpu_hours on CUDA)."""
    out = {"counter": COUNTER, **parameters(net), "forward_gflops": forward / 1e9, "step": int(step),
           "samples_seen": int(samples_seen), "train_flops": train_flops(forward, samples_seen)}
    if seconds is not None:
        hours = float(f"{float(seconds) * devices / 3600:.4g}")
        out |= {"train_loop_seconds": round(float(seconds), 3), "devices": devices, "accelerator": accelerator,
                "device_hours": hours, **({"gpu_hours": hours} if accelerator in ("cuda", "gpu") else {})}
    return out


def sampling(module, nfe: int, n_samples: int, guidance, labelled: bool) -> dict:
    """The sampling half of protocol["compute"] for drawing n_samples with this module, sampler NFE and guidance."""
    forward = module_forward_flops(module)
    factor = cfg_factor(guidance, labelled)
    extra = guidance_flops(guidance, module.sample_shape, module.device) if labelled else 0
    decode = decode_flops(module.space)
    out = {"counter": COUNTER, "forward_gflops": forward / 1e9, "nfe": int(nfe), "n_samples": int(n_samples),
           "cfg_factor": factor, "decode_gflops": decode / 1e9,
           "sampling_flops": sampling_flops(forward, nfe, n_samples, factor, extra, decode)}
    if extra:
        out["classifier_guidance_gflops"] = extra / 1e9  # per net evaluation per sample
    encode = encode_flops(module.space)
    if encode:
        out["encode_gflops"] = encode / 1e9  # per training item; not in train_flops (see the module docstring)
    return out


def module_forward_flops(module) -> int:
    """The module's denoiser forward FLOPs, counted once and kept on the module (a batch-1 forward)."""
    cached = module.__dict__.get("_forward_flops")
    if cached is None:
        cached = forward_flops(module.net, module.sample_shape, module.num_classes, module.device)
        module.__dict__["_forward_flops"] = cached
    return cached


def summary_line(compute: dict) -> str:
    """One console line: params, GFLOPs per forward, training and sampling FLOPs."""
    parts = []
    if "parameters" in compute:
        parts.append(f"{compute['parameters'] / 1e6:.3g}M params")
    if "forward_gflops" in compute:
        parts.append(f"{compute['forward_gflops']:.4g} GFLOPs/forward")
    if "train_flops" in compute:
        parts.append(f"train {compute['train_flops']:.3e} FLOPs ({compute['samples_seen']} samples)")
    if "sampling_flops" in compute:
        cfg = " x2 CFG" if compute.get("cfg_factor", 1) == 2 else ""
        parts.append(f"sampling {compute['sampling_flops']:.3e} FLOPs (NFE {compute['nfe']}{cfg})")
    if compute.get("gpu_hours") is not None:
        parts.append(f"{compute['gpu_hours']:.4g} GPU-h")
    elif compute.get("device_hours") is not None:
        parts.append(f"{compute['device_hours']:.4g} device-h")
    return ", ".join(parts)
