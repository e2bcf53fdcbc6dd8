"""FID/KID through the suite vs a direct torch_fidelity.calculate_metrics call on the same uint8 images.

    python benchmarks/fidelity_mnist.py --root ../shared/data \
        --weights ../shared/data/weights/pt_inception-2015-12-05_reconstructed_fc-nan.pth --n 1000

Compares 1000 MNIST training vs 1000 test digits (suite == direct to 1e-3), and 1000 training digits vs
1000 uniform-noise images (FID must be far above 300). Prints a table and writes benchmarks/fidelity_mnist.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch_fidelity

from diffusion_lab.data import MNISTDataModule
from diffusion_lab.fidelity import InceptionFeatures, fidelity_metrics


class U8(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x.expand(-1, 3, -1, -1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="../shared/data")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--out", default=str(Path(__file__).with_name("fidelity_mnist.json")))
    args = ap.parse_args()
    dm = MNISTDataModule(root=args.root, download=args.weights is None)
    train, test = dm.real_uint8("train", args.n), dm.real_uint8("test", args.n)
    noise = torch.randint(0, 256, train.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    t0 = time.perf_counter()
    ext = InceptionFeatures(args.weights, "cuda" if torch.cuda.is_available() else "cpu")
    f_train, f_test, f_noise = ext(train), ext(test), ext(noise)
    suite_seconds = time.perf_counter() - t0
    rows = {}
    for name, gen, g_u8 in (("test vs train", f_test, test), ("noise vs train", f_noise, noise)):
        ours, _ = fidelity_metrics(gen, f_train, ["fid", "kid"])
        t1 = time.perf_counter()
        direct = torch_fidelity.calculate_metrics(input1=U8(g_u8), input2=U8(train), cuda=torch.cuda.is_available(),
                                                  fid=True, kid=True, kid_subset_size=min(1000, args.n),
                                                  feature_extractor_weights_path=args.weights, verbose=False)
        rows[name] = {"suite_fid": ours["fid"], "direct_fid": direct["frechet_inception_distance"],
                      "suite_kid_mean": ours["kid_mean"], "direct_kid_mean": direct["kernel_inception_distance_mean"],
                      "suite_kid_std": ours["kid_std"], "direct_kid_std": direct["kernel_inception_distance_std"],
                      "direct_seconds": round(time.perf_counter() - t1, 1)}
    result = {"n": args.n, "weights": args.weights or "torch-fidelity download", "weights_sha256": ext.weights_sha256,
              "suite_feature_seconds_3n_images": round(suite_seconds, 1), "machine": platform.platform(),
              "torch": torch.__version__, "torch_fidelity": torch_fidelity.__version__,
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"| pair (n={args.n}) | FID suite | FID direct | KID suite | KID direct |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['suite_fid']:.4f} | {r['direct_fid']:.4f} | {r['suite_kid_mean']:.6f} ± "
              f"{r['suite_kid_std']:.6f} | {r['direct_kid_mean']:.6f} ± {r['direct_kid_std']:.6f} |")
    worst = max(abs(r["suite_fid"] - r["direct_fid"]) for r in rows.values())
    print(f"max |FID suite - direct| = {worst:.2e}; wrote {args.out}")


if __name__ == "__main__":
    main()
