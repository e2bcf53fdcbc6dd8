"""Training-throughput benchmark: img/s of real training steps (data, forward, backward, optimizer, EMA).

    python benchmarks/bench.py [--quick] [--out benchmarks/results.json]

For each net preset it trains through the same build() + Lightning Trainer as `run.py` and times the
steps after a warm-up. Axes: precision (fp32 / bf16 autocast), channels_last, and the data path
(GPU/CPU-resident uint8 tensor with per-batch conversion vs a torch DataLoader doing per-item
conversion, the usual torchvision-transform pipeline). Results go to JSON and to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion_lab.build import build  # noqa: E402
from diffusion_lab.callbacks import EMA  # noqa: E402

PRESETS = {  # name: (model preset, data shape, batch on CPU, batch on GPU)
    "simple_unet": ("simple_unet", (1, 28, 28), 128, 512),
    "unet_cifar": ("unet_cifar", (3, 32, 32), 8, 128),
}


class StepTimer(L.Callback):
    """Wall time of the steps after `warmup` (synchronising CUDA at the two ends only)."""

    def __init__(self, warmup: int):
        self.warmup, self.t0, self.t1, self.images = warmup, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.t0 is not None:
            self.images += batch["x"].shape[0]

    def on_train_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t1 = time.perf_counter()


class PerItemImages(Dataset):
    """The DataLoader baseline: uint8 images converted one item at a time, as torchvision transforms do."""

    def __init__(self, u8: torch.Tensor):
        self.u8 = u8

    def __len__(self):
        return len(self.u8)

    def __getitem__(self, i):
        x = self.u8[i].float() / 127.5 - 1
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x


class SyntheticImages(L.LightningDataModule):
    """Random uint8 images of a given shape, served resident (index draws) or through a DataLoader."""

    kind = "images"

    def __init__(self, shape, batch_size: int, resident: bool, n: int = 4096):
        super().__init__()
        self.shape, self.batch_size, self.resident = tuple(shape), batch_size, resident
        self.u8 = torch.randint(0, 256, (n, *shape), dtype=torch.uint8)

    def train_dataloader(self):
        if self.resident:
            from diffusion_lab.data.lowdim import InMemoryBatches

            flip = lambda b, seed: {"x": torch.where(torch.rand(len(b["x"]), 1, 1, 1) < 0.5, b["x"].flip(-1),
                                                     b["x"]).float() / 127.5 - 1, "cond": None}
            return InMemoryBatches(self.u8, None, self.batch_size, 10**6, seed=0, transform=flip)
        loader = DataLoader(PerItemImages(self.u8), batch_size=self.batch_size, shuffle=True, drop_last=True,
                            num_workers=0)
        return _DictLoader(loader)


class _DictLoader:
    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        while True:
            for x in self.loader:
                yield {"x": x, "cond": None}


def run_case(preset: str, precision: str, channels_last: bool, resident: bool, steps: int, warmup: int,
             device: str) -> dict:
    model, shape, cpu_batch, gpu_batch = PRESETS[preset]
    batch = gpu_batch if device == "cuda" else cpu_batch
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "experiment=mnist_ddpm" if shape[0] == 1 else "experiment=cifar10_ddpm", f"model={model}",
            f"train.channels_last={str(channels_last).lower()}", "callbacks=minimal", "callbacks.checkpoint=null",
            "logger=none", "lr_scheduler=constant", "data.download=false"])
    with open_dict(cfg):
        cfg.name, cfg.run_dir = "bench", "/tmp/diffusion_lab_bench"
    parts = build(cfg)
    timer = StepTimer(warmup)
    trainer = L.Trainer(max_steps=warmup + steps, precision=precision, accelerator=device, devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer, EMA(decay=0.999)])
    trainer.fit(parts.module, datamodule=SyntheticImages(shape, batch, resident))
    seconds = timer.t1 - timer.t0
    params = sum(p.numel() for p in parts.module.net.parameters())
    return {"preset": preset, "params": params, "batch": batch, "precision": precision,
            "channels_last": channels_last, "data": "resident" if resident else "DataLoader",
            "steps": steps, "img_per_s": round(timer.images / seconds, 2)}


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def to_markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| preset | params | batch | precision | channels_last | data | img/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['precision']} | "
                     f"{r['channels_last']} | {r['data']} | **{r['img_per_s']}** |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (smoke run)")
    ap.add_argument("--presets", default="simple_unet,unet_cifar")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results.json"))
    ap.add_argument("--results-md", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for preset in args.presets.split(","):
        steps = {"simple_unet": 60, "unet_cifar": 8}[preset] // (3 if args.quick else 1) or 2
        cases = [("32-true", False, True), ("bf16-mixed", False, True), ("bf16-mixed", True, True),
                 ("32-true", True, True), ("bf16-mixed", True, False)]
        for precision, cl, resident in cases:
            row = run_case(preset, precision, cl, resident, steps=steps, warmup=2, device=device)
            print(json.dumps(row), flush=True)
            rows.append(row)
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    header = (f"### Training throughput — {machine()} — torch {torch.__version__}, lightning {L.__version__} — "
              f"{stamp}")
    Path(args.out).write_text(json.dumps({"machine": machine(), "date": stamp, "rows": rows}, indent=2))
    md = Path(args.results_md)
    md.write_text((md.read_text() if md.exists() else "# Benchmark results\n\n") + "\n" + to_markdown(rows, header))
    print(to_markdown(rows, header))


if __name__ == "__main__":
    main()
