"""Compute accounting (compute.py): FLOPs per forward against hand counts of multiply-adds, and the sampling
FLOPs of protocol["compute"] against the FLOPs the sampling call really runs (CFG's doubled batch, classifier
guidance, a latent space's decoder). The collector's columns are read back from real runs in test_sweeps.py
and test_resume.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import compose_cfg, write_autoencoder_ckpt
from torch import nn

from diffusion_lab import compute
from diffusion_lab.build import build, make
from diffusion_lab.guidance import ClassifierFree, ClassifierGuidance
from diffusion_lab.nets.mlp import MLP
from diffusion_lab.report import training_facts


def mlp_macs(dim: int, hidden: int, depth: int) -> int:
    """Multiply-adds of the CSE849 MLP: [x, t] -> hidden, depth - 1 hidden -> hidden, hidden -> x."""
    return (dim + 1) * hidden + (depth - 1) * hidden * hidden + hidden * dim


class ConvAttentionNet(nn.Module):
    """A net of the denoiser contract with a conv, multi-head attention (F.scaled_dot_product_attention) and a
    linear layer, small enough to count by hand."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.qkv = nn.Linear(8, 24)
        self.out = nn.Linear(8 * 36, 5)
        self.num_classes = 0

    def forward(self, x, t, cond=None):
        h = self.conv(x)  # (1, 8, 6, 6)
        tokens = h.flatten(2).transpose(1, 2)  # (1, 36, 8)
        q, k, v = self.qkv(tokens).view(1, 36, 3, 2, 4).permute(2, 0, 3, 1, 4)  # 2 heads of 4
        a = F.scaled_dot_product_attention(q, k, v)  # (1, 2, 36, 4)
        return self.out(a.transpose(1, 2).flatten(1))


def test_forward_flops_equal_hand_counted_multiply_adds():
    # conv: k*k*cin*cout per output position; linear: in*out per token; attention: QK^T and AV, s*s*d per head each
    conv = 3 * 3 * 3 * 8 * 6 * 6
    qkv = 36 * 8 * 24
    attention = 2 * (2 * 36 * 36 * 4)
    out = 8 * 36 * 5
    net = ConvAttentionNet().train()
    net.conv.eval()
    assert compute.forward_flops(net, (3, 6, 6)) == conv + qkv + attention + out
    assert net.training and not net.conv.training  # each module's train/eval mode is restored
    seq = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    assert compute.count_flops(seq, torch.zeros(1, 10)) == 10 * 20 + 20 * 3  # activations and biases are free
    for dim, hidden, depth, classes in ((2, 256, 4, 0), (3, 64, 2, 5)):
        mlp = MLP(dim, hidden=hidden, depth=depth, num_classes=classes)
        assert compute.forward_flops(mlp, (dim,), classes) == mlp_macs(dim, hidden, depth)


def test_training_and_sampling_formulas_and_parameters():
    net = MLP(2, hidden=16, depth=2)
    net.inp.weight.requires_grad_(False)
    n_params = 3 * 16 + 16 + 16 * 16 + 16 + 16 * 2 + 2
    assert compute.parameters(net) == {"parameters": n_params, "trainable_parameters": n_params - 3 * 16}
    spent = compute.training(net, forward=1000, step=20, samples_seen=20 * 64, seconds=7200, devices=4,
                             accelerator="cuda")
    assert spent["train_flops"] == 3 * 1000 * 20 * 64 and spent["forward_gflops"] == 1e-6
    assert spent["gpu_hours"] == spent["device_hours"] == 8.0
    assert compute.sampling_flops(1000, nfe=50, n_samples=10, cfg=2, guidance=0, decode=7) == 10 * (50 * 2000 + 7)
    assert compute.cfg_factor(ClassifierFree(3.0), labelled=True) == 2
    assert compute.cfg_factor(ClassifierFree(1.0), labelled=True) == 1  # guided_net skips the batch at scale 1
    assert compute.cfg_factor(ClassifierFree(3.0), labelled=False) == compute.cfg_factor(None, True) == 1


def measured_sampling(module, n, **kwargs) -> int:
    """FLOPs that module.sample really runs (batched guidance, every step, the decoder)."""
    return compute.count_flops(module.sample, n, torch.Generator().manual_seed(0), **kwargs)


def test_sampling_flops_equal_what_sampling_runs_under_cfg_and_classifier_guidance(tmp_path):
    cfg = compose_cfg(["experiment=states_cfg", "model.hidden=32", "sampler=ddim", "sampler.steps=3",
                       "guidance.scale=3.0", "timesteps=50", "classifier=mlp", "classifier.hidden=[8,16]"], tmp_path)
    module = build(cfg).module
    forward = compute.forward_flops(module.net, (2,), 5)
    assert forward == mlp_macs(2, 32, 4)
    labels = torch.tensor([0, 1, 2, -1, 4])  # unconditional rows ride in the same doubled batch
    cases = {"cfg 3": (module.guidance, labels), "cfg 1": (ClassifierFree(1.0), labels),
             "unlabelled": (module.guidance, None)}
    guided = ClassifierGuidance.__new__(ClassifierGuidance)  # a classifier net without a checkpoint file
    guided.classifier, guided.scale, guided.chunk = make(cfg, "classifier").eval(), 2.0, 4096
    cases["classifier"] = (guided, labels)
    spent = {}
    for name, (guidance, cond) in cases.items():
        spent[name] = compute.sampling(module, nfe=3, n_samples=5, guidance=guidance, labelled=cond is not None)
        assert spent[name]["sampling_flops"] == measured_sampling(module, 5, cond=cond, guidance=guidance), name
    assert spent["cfg 3"]["cfg_factor"] == 2 and spent["cfg 3"]["sampling_flops"] == 5 * 3 * 2 * forward
    assert spent["cfg 1"]["sampling_flops"] == spent["unlabelled"]["sampling_flops"] == 5 * 3 * forward
    classifier = (3 * 8 + 8 * 16 + 16 * 5) * 2  # forward + input gradient (no weight gradients)
    assert spent["classifier"]["classifier_guidance_gflops"] * 1e9 == pytest.approx(classifier)
    assert spent["classifier"]["sampling_flops"] == 5 * 3 * (forward + classifier)


def test_latent_space_sampling_counts_the_decoder(tmp_path):
    ae = write_autoencoder_ckpt(tmp_path / "ae.ckpt")
    cfg = compose_cfg(["experiment=mnist_ldm", f"space.ckpt={ae}", "data.root=unused", "model.ch=32",
                       "model.num_res_blocks=1", "sampler.steps=2"], tmp_path)
    module = build(cfg).module
    module.space.set_scaling(torch.zeros(4), torch.ones(4), "test")
    spent = compute.sampling(module, nfe=2, n_samples=3, guidance=None, labelled=False)
    decode = compute.decode_flops(module.space)
    assert decode > 0 and spent["decode_gflops"] * 1e9 == pytest.approx(decode)
    assert spent["encode_gflops"] > 0  # reported, not part of train_flops
    forward = compute.module_forward_flops(module)
    assert spent["sampling_flops"] == 3 * (2 * forward + decode) == measured_sampling(module, 3)
    pixels = compose_cfg(["experiment=mnist_ldm_pixels", "data.root=unused", "model.ch=32",
                          "model.num_res_blocks=1"], tmp_path)
    assert compute.decode_flops(build(pixels).module.space) == 0  # [-1, 1] pixels decode for free


def test_report_rows_show_the_compute(tmp_path):
    class FakeTrainer:  # the attributes training_facts reads
        num_devices, num_nodes, accumulate_grad_batches, global_step, current_epoch, precision = 1, 1, 1, 20, 0, "32"
        accelerator = type("CPUAccelerator", (), {})()
        callbacks, datamodule = [], None  # no History callback, no datamodule: no loss rows, no fractional epoch

    spent = {"forward_gflops": 2e-4, "train_flops": 3 * 200_000 * 1280, "samples_seen": 1280, "nfe": 20,
             "cfg_factor": 2, "sampling_flops": 10**9, "counter": compute.COUNTER}
    facts = training_facts(FakeTrainer(), MLP(2), 64, 1.0, tmp_path, spent)
    assert facts["training_FLOPs"] == 7.68e8 and facts["sampling_FLOPs"] == 1e9
    assert facts["forward_GFLOPs_per_sample"] == 2e-4 and facts["sampling_NFE_x_CFG_factor"] == "20 x 2"
