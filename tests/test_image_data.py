"""Image DataModules on tiny fixtures written in the real on-disk formats (CIFAR pickles, IDX, CelebA, folders)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_idx
from PIL import Image

from diffusion_lab.data import (
    CelebA64DataModule,
    CIFAR10DataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    from_uint8,
    to_uint8,
)
from diffusion_lab.data import celeba as celeba_mod
from diffusion_lab.data.images import RandomFlip
from diffusion_lab.spaces import PixelSpace

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data"
ATTRS = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
         "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
         "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
         "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
         "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()
EXCLUDED = ("Blurry", "Eyeglasses", "Heavy_Makeup", "Wearing_Hat")


# ---------------------------------------------------------------- fixtures in the real formats

def write_cifar(root: Path, per_batch: int = 6, n_test: int = 4) -> np.ndarray:
    """cifar-10-batches-py/: data_batch_1..5, test_batch, batches.meta (pickles, b"data" uint8 (N, 3072))."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = []
    for name, n in [*[(f"data_batch_{i}", per_batch) for i in range(1, 6)], ("test_batch", n_test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}, f)
        if name != "test_batch":
            train.append(data)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)], b"num_cases_per_batch": per_batch,
                     b"num_vis": 3072}, f)
    return np.concatenate(train)


def write_celeba_export(root: Path, n: int = 8) -> tuple[list[str], list[str]]:
    """<root>/celeba-subset/train/images/NNNNNN.png (64x64) + train/attributes.csv (image_id + 40 x 0/1)."""
    split = root / "celeba-subset" / "train"
    (split / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows, kept = [], []
    for i in range(1, n + 1):
        name = f"{i:06d}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(split / "images" / name)
        attr = [int(v) for v in rng.integers(0, 2, 40)]
        for a in EXCLUDED:
            attr[ATTRS.index(a)] = 1 if i in (2, 5) else 0  # images 2 and 5 carry excluded attributes
        rows.append(",".join([name, *map(str, attr)]))
        kept += [] if i in (2, 5) else [name]
    (split / "attributes.csv").write_text("\n".join([",".join(["image_id", *ATTRS]), *rows]) + "\n")
    return kept, [f"{i:06d}.png" for i in range(1, n + 1)]


def write_celeba_torchvision(root: Path, n: int = 12) -> dict:
    """<root>/celeba/: img_align_celeba/*.jpg (178x218), list_attr_celeba.txt (-1/1), list_eval_partition.txt."""
    base = root / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(2)
    attr_lines, part_lines, info = [], [], {}
    for i in range(1, n + 1):
        name = f"{i:06d}.jpg"
        img = np.full((218, 178, 3), 20, np.uint8)  # dark border outside the 140x140 centre crop
        img[39:179, 19:159] = (200, 120, 40)         # the centre crop is one colour
        Image.fromarray(img).save(base / "img_align_celeba" / name, quality=95)
        attr = [int(v) for v in rng.choice([-1, 1], 40)]
        for a in EXCLUDED:
            attr[ATTRS.index(a)] = -1
        if i % 3 == 0:  # every third image has one excluded attribute
            attr[ATTRS.index(EXCLUDED[i % 4])] = 1
        split = 0 if i <= 8 else (1 if i <= 10 else 2)
        attr_lines.append(name + " " + " ".join(f"{v:2d}" for v in attr))  # the original pads with spaces
        part_lines.append(f"{name} {split}")
        info[name] = (split, i % 3 == 0)
    (base / "list_attr_celeba.txt").write_text("\n".join([str(n), " ".join(ATTRS), *attr_lines]) + "\n")
    (base / "list_eval_partition.txt").write_text("\n".join(part_lines) + "\n")
    return info


def write_folder(root: Path) -> None:
    """<root>/{cat,dog}/*.png of mixed, non-square sizes."""
    rng = np.random.default_rng(3)
    for c, cls in enumerate(["cat", "dog"]):
        (root / cls).mkdir(parents=True)
        for i in range(3 + c):
            h, w = (24, 40) if i % 2 else (36, 30)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")


# ---------------------------------------------------------------- tests

def test_uint8_round_trip_and_range():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = from_uint8(u)
    assert x.min() == -1 and x.max() == 1
    space = PixelSpace(1, 16)  # the pixel space's encode -> decode round trip is exact on uint8
    assert torch.equal(to_uint8(x), u) and torch.equal(to_uint8(space.decode(space.encode(u))), u)
    assert torch.equal(space.encode(u), x) and space.shape == space.data_shape == (1, 16, 16)
    assert torch.equal(to_uint8(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))


def test_cifar_pickle_layout(tmp_path):
    raw = write_cifar(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), download=False, batch_size=8, seed=0)
    dm.setup()
    assert dm.data.shape == (30, 3, 32, 32) and dm.data.dtype == torch.uint8
    assert torch.equal(dm.data.reshape(30, -1), torch.from_numpy(raw))  # planes R, G, B, row-major
    assert dm.class_names[:2] == ["class0", "class1"] and dm.shape == (3, 32, 32)
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (8, 3, 32, 32) and batch["x"].dtype == torch.uint8  # the space maps to [-1, 1]
    assert batch["cond"].dtype == torch.long and 0 <= int(batch["cond"].min()) and int(batch["cond"].max()) <= 9
    assert len(dm.train_dataloader()) == 4  # ceil(30 / 8): one pass
    assert dm.real_uint8("test").shape == (4, 3, 32, 32)
    assert torch.equal(dm.real_uint8(n=5), dm.real_uint8(n=5)) and len(dm.real_uint8(n=5)) == 5
    assert dm.describe() == {"name": "cifar10", "n": 30, "shape": [3, 32, 32], "num_classes": 10,
                             "root": str(tmp_path)}
    uncond = CIFAR10DataModule(root=str(tmp_path), download=False, num_classes=0)
    assert next(iter(uncond.train_dataloader()))["cond"] is None


def test_hflip_flips_some_samples_only_horizontally(tmp_path):
    write_cifar(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), download=False, batch_size=30, hflip=True)
    dm.setup()
    x = next(iter(dm.train_dataloader()))["x"]
    orig, flipped = dm.data, dm.data.flip(-1)
    kinds = []
    for xi in x:
        is_orig = (orig == xi).flatten(1).all(1)
        is_flip = (flipped == xi).flatten(1).all(1)
        assert int(is_orig.sum() + is_flip.sum()) == 1  # exactly one source, as is or mirrored left-right
        kinds.append(bool(is_flip.any()))
    assert 0 < sum(kinds) < len(kinds)
    off = CIFAR10DataModule(root=str(tmp_path), download=False, batch_size=30, hflip=False)
    off.setup()
    assert all((off.data == xi).flatten(1).all(1).any() for xi in next(iter(off.train_dataloader()))["x"])


def test_same_seed_same_batches_and_resume(tmp_path):
    write_cifar(tmp_path)
    make = lambda seed: CIFAR10DataModule(root=str(tmp_path), download=False, batch_size=8, seed=seed)
    a, b, c = make(0).train_dataloader(), make(0).train_dataloader(), make(1).train_dataloader()
    ba, bb, bc = list(a), list(b), list(c)
    assert all(torch.equal(p["x"], q["x"]) and torch.equal(p["cond"], q["cond"]) for p, q in zip(ba, bb))
    assert not torch.equal(ba[0]["x"], bc[0]["x"])
    # resume mid-epoch from a state_dict: the same batches, flips included
    full = list(make(3).train_dataloader())
    part = make(3).train_dataloader()
    it = iter(part)
    next(it), next(it)
    state = part.state_dict()
    resumed = make(3).train_dataloader()
    resumed.load_state_dict(state)
    assert all(torch.equal(p["x"], q["x"]) for p, q in zip(full[2:], list(resumed)))


def test_flip_transform_is_seeded():
    u = torch.randint(0, 256, (16, 3, 4, 4), dtype=torch.uint8)
    t = RandomFlip(hflip=True)
    assert torch.equal(t({"x": u, "cond": None}, 5)["x"], t({"x": u, "cond": None}, 5)["x"])
    assert torch.equal(RandomFlip(False)({"x": u, "cond": None}, 5)["x"], u)


def test_mnist_idx_fixture_and_padding(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(4).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    write_idx(raw / "train-images-idx3-ubyte.gz", images)
    write_idx(raw / "train-labels-idx1-ubyte.gz", np.arange(7) % 10)
    dm = MNISTDataModule(root=str(tmp_path), download=False, batch_size=4)
    dm.setup()
    assert torch.equal(dm.data[:, 0], torch.from_numpy(images)) and dm.labels.tolist() == list(range(7))
    assert sorted(os.listdir(raw)) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]  # nothing extracted
    padded = MNISTDataModule(root=str(tmp_path), download=False, pad_to_32=True, image_size=32)
    padded.setup()
    assert padded.shape == (1, 32, 32) and padded.data[:, :, :2].sum() == 0
    assert torch.equal(padded.data[:, :, 2:30, 2:30], dm.data)
    with pytest.raises(ValueError, match=r"^image_size=28: MNIST gives 32x32"):
        MNISTDataModule(root=str(tmp_path), pad_to_32=True, image_size=28)


@pytest.mark.skipif(not (SHARED_MNIST / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file(),
                    reason="shared MNIST files absent")
def test_mnist_real_files():
    dm = MNISTDataModule(root=str(SHARED_MNIST), download=False, batch_size=256)
    dm.setup()
    assert dm.data.shape == (60000, 1, 28, 28) and dm.data.dtype == torch.uint8
    assert sorted(dm.labels.unique().tolist()) == list(range(10))
    assert dm.real_uint8("test").shape == (10000, 1, 28, 28)
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (256, 1, 28, 28) and batch["x"].dtype == torch.uint8 and batch["x"].max() > 0
    assert len(dm.train_dataloader()) == 235


def test_celeba_export_layout(tmp_path):
    kept, _ = write_celeba_export(tmp_path)
    dm = CelebA64DataModule(root=str(tmp_path), layout="export", hflip=False, batch_size=4)
    dm.setup()
    assert dm.files == kept  # images carrying an excluded attribute are dropped
    assert dm.data.shape == (6, 3, 64, 64) and dm.attributes.shape == (6, 36)
    assert not set(EXCLUDED) & set(dm.attribute_names) and len(dm.attribute_names) == 36
    png = np.array(Image.open(tmp_path / "celeba-subset" / "train" / "images" / kept[0]))
    assert torch.equal(dm.data[0], torch.from_numpy(png).permute(2, 0, 1))  # lossless, no resize at 64
    batch = next(iter(dm.train_dataloader()))
    assert batch["cond"] is None and batch["x"].shape == (4, 3, 64, 64)
    # the subset folder itself is accepted as the root too
    direct = CelebA64DataModule(root=str(tmp_path / "celeba-subset"), cache=False)
    direct.setup()
    assert direct.files == kept


def test_celeba_torchvision_layout_filter_crop_cache(tmp_path, monkeypatch):
    info = write_celeba_torchvision(tmp_path)
    dm = CelebA64DataModule(root=str(tmp_path), layout="torchvision", download=False)
    dm.setup()
    expect = [n for n, (split, excluded) in sorted(info.items()) if split == 0 and not excluded]
    assert dm.files == expect and dm.attributes.shape == (len(expect), 36)
    assert dm.data.shape == (len(expect), 3, 64, 64)
    # only the 140x140 centre survives the crop: every pixel is close to its colour (JPEG error aside)
    assert (dm.data.float() - torch.tensor([200.0, 120, 40])[:, None, None]).abs().mean() < 4
    caches = list(tmp_path.glob("celeba64_cache_*.pt"))
    assert len(caches) == 1
    monkeypatch.setattr(celeba_mod, "decode_images", lambda *a, **k: pytest.fail("cache not used"))
    again = CelebA64DataModule(root=str(tmp_path), layout="torchvision", download=False)
    again.setup()
    assert torch.equal(again.data, dm.data)
    monkeypatch.undo()
    test = dm.real_uint8("test")
    assert len(test) == sum(split == 2 and not ex for split, ex in info.values())
    no_filter = CelebA64DataModule(root=str(tmp_path), layout="torchvision", exclude_attributes=(), cache=False)
    no_filter.setup()
    assert len(no_filter.data) == 8 and no_filter.attributes.shape == (8, 40)
    with pytest.raises(ValueError, match="unknown CelebA attribute"):
        CelebA64DataModule(root=str(tmp_path), layout="torchvision", exclude_attributes=("Hat",)).setup()


def test_image_folder_stream_and_preload(tmp_path):
    write_folder(tmp_path / "tree")
    dm = ImageFolderDataModule(root=str(tmp_path / "tree"), image_size=16, num_classes=2, batch_size=3,
                               num_workers=0)
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and dm.class_names == ["cat", "dog"]
    x = torch.cat([b["x"] for b in batches])
    assert x.shape == (6, 3, 16, 16) and x.dtype == torch.uint8  # raw items: the space maps them
    assert set(torch.cat([b["cond"] for b in batches]).tolist()) <= {0, 1}
    pre = ImageFolderDataModule(root=str(tmp_path / "tree"), image_size=16, num_classes=2, batch_size=3,
                                preload=True, hflip=False, num_workers=0)
    pre.setup()
    assert pre.data.shape == (7, 3, 16, 16) and pre.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    views = torch.cat([pre.data, pre.data.flip(-1)])  # each streamed item is a decoded file, as is or mirrored
    assert all((views == xi).flatten(1).all(1).any() for xi in x)
    assert torch.equal(dm.real_uint8(), pre.real_uint8()) and len(dm.real_uint8(n=4)) == 4
    with pytest.raises(ValueError, match=r"^num_classes=5: expected 0 \(unconditional\) or 2"):
        ImageFolderDataModule(root=str(tmp_path / "tree"), image_size=16, num_classes=5).setup()


@pytest.mark.parametrize("make,needle", [
    (lambda r: MNISTDataModule(root=r, download=False), "MNIST/raw"),
    (lambda r: CIFAR10DataModule(root=r, download=False), "cifar-10-batches-py"),
    (lambda r: CelebA64DataModule(root=r, layout="export"), "celeba-subset/train/images"),
    (lambda r: CelebA64DataModule(root=r, layout="torchvision", download=False), "celeba"),
    (lambda r: ImageFolderDataModule(root=r + "/nope", num_workers=0), "nope"),
])
def test_missing_data_names_the_path(tmp_path, make, needle):
    with pytest.raises(FileNotFoundError) as info:
        make(str(tmp_path)).setup()
    msg = str(info.value)
    assert str(tmp_path) in msg and needle in msg and "\n" not in msg and "DIFFUSION_LAB_DATA" in msg


def test_shape_mismatch_names_the_key(tmp_path):
    write_cifar(tmp_path)
    with pytest.raises(ValueError, match=r"^channels=1 but cifar10 images have 3 channels"):
        CIFAR10DataModule(root=str(tmp_path), download=False, channels=1).setup()
    with pytest.raises(ValueError, match=r"^image_size=64 but cifar10 images are 32x32"):
        CIFAR10DataModule(root=str(tmp_path), download=False, image_size=64).setup()


def test_overfit_repeats_one_unflipped_batch(tmp_path):
    write_cifar(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), download=False, batch_size=8, overfit=True)
    batches = list(dm.train_dataloader())
    assert all(torch.equal(b["x"], batches[0]["x"]) for b in batches)
