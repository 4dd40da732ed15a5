"""Tests of nc_lib.data: subsampling, standardisation, labels, augmentation, loaders, offline errors."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from nc_lib import data
from nc_lib.data import (DATASETS, DatasetUnavailableError, balanced_indices, dataset_info, load_dataset,
                         load_train_test, make_loader, set_loader_epoch, without_augmentation)


@pytest.fixture(autouse=True)
def _tmp_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NC_DATA_DIR", str(tmp_path / "data"))


@pytest.mark.parametrize("name,per_class", [("digits", 50), ("mnist1d", 120), ("gaussian", 30)])
def test_balanced_subsampling_gives_exact_per_class_counts(name, per_class):
    ds = load_dataset(name, split="train", per_class=per_class, seed=3)
    counts = torch.bincount(ds.targets, minlength=ds.num_classes)
    assert counts.tolist() == [per_class] * ds.num_classes
    assert len(ds) == per_class * ds.num_classes


def test_subsample_is_seeded():
    a = load_dataset("digits", split="train", per_class=20, seed=1)
    b = load_dataset("digits", split="train", per_class=20, seed=1)
    c = load_dataset("digits", split="train", per_class=20, seed=2)
    assert torch.equal(a.raw, b.raw) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.raw, c.raw)


def test_balanced_indices_errors_and_values():
    t = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    idx = balanced_indices(t, 2, seed=0)
    assert torch.bincount(t[idx]).tolist() == [2, 2, 2]
    assert torch.equal(idx, torch.sort(idx).values)
    with pytest.raises(ValueError, match="per_class=3"):
        balanced_indices(t, 3)
    with pytest.raises(ValueError, match="per_class"):
        load_dataset("digits", split="train", per_class=10_000)


def test_per_pixel_standardisation_uses_training_statistics():
    train = load_dataset("digits", split="train")
    test = load_dataset("digits", split="test")
    x, _ = train.get_batch(torch.arange(len(train)))
    mean, std = x.mean(0), x.std(0, unbiased=False)
    varying = train.std != 1.0  # pixels with non-zero deviation
    assert mean.abs().max() < 1e-4
    assert torch.allclose(std[varying], torch.ones_like(std[varying]), atol=1e-4)
    assert torch.equal(test.mean, train.mean) and torch.equal(test.std, train.std)
    assert x.shape[1:] == (1, 8, 8)
    assert len(test) == 300 and torch.bincount(test.targets).tolist() == [30] * 10


def test_random_labels_keep_counts_and_break_the_labels():
    clean = load_dataset("digits", split="train", per_class=100, seed=0)
    noisy = load_dataset("digits", split="train", per_class=100, seed=0, random_labels=True)
    assert torch.equal(clean.raw, noisy.raw)
    assert torch.bincount(noisy.targets).tolist() == [100] * 10
    agreement = (clean.targets == noisy.targets).float().mean()
    assert agreement < 0.25  # about 1/C by chance
    _, test = load_train_test("digits", random_labels=True)
    assert torch.equal(test.targets, load_dataset("digits", split="test").targets)


def test_augmentation_crops_and_flips_images_only():
    torch.manual_seed(0)
    aug = load_dataset("digits", split="train", per_class=10, augment=True)
    plain = without_augmentation(aug)
    xa, ya = aug.get_batch(torch.arange(len(aug)))
    xp, yp = plain.get_batch(torch.arange(len(plain)))
    assert xa.shape == xp.shape and torch.equal(ya, yp)
    assert not torch.equal(xa, xp)
    # every augmented image is a shifted / flipped copy: its pixels come from the padded original
    padded = torch.nn.functional.pad(xp, (4, 4, 4, 4))
    i = 0
    found = any(torch.equal(xa[i], padded[i, :, dy:dy + 8, dx:dx + 8].flip(-1) if f else padded[i, :, dy:dy + 8, dx:dx + 8])
                for dy in range(9) for dx in range(9) for f in (False, True))
    assert found
    with pytest.raises(ValueError, match="augment"):
        load_dataset("mnist1d", split="train", augment=True)


def test_mnist1d_offline_and_leaves_global_rng_alone():
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    train, test = load_train_test("mnist1d")
    assert (np.random.rand(), random.random()) == (expected_np, expected_py)
    assert len(train) == 4000 and len(test) == 1000
    assert train.input_shape == (1, 40)
    assert dataset_info("mnist1d") == {"num_classes": 10, "input_shape": (1, 40)}


def test_fake_and_gaussian_shapes():
    fake = load_dataset("fake", split="train", image_size=(3, 16, 16), size=20, num_classes=4)
    assert fake.input_shape == (3, 16, 16) and torch.bincount(fake.targets).tolist() == [5] * 4
    g = load_dataset("gaussian", split="test", dim=5, num_classes=3, n_per_class=7)
    assert g.input_shape == (5,) and len(g) == 21
    with pytest.raises(ValueError, match="valid options"):
        load_dataset("digits", split="train", dim=3)


def test_bad_names_list_the_choices():
    with pytest.raises(ValueError, match="cifar10"):
        load_dataset("cifar11", split="train")
    with pytest.raises(ValueError, match="train"):
        load_dataset("digits", split="validation")


def test_loader_order_is_fixed_by_seed_and_epoch():
    ds = load_dataset("digits", split="train", per_class=20)

    def order(seed, epoch):
        loader = make_loader(ds, 32, shuffle=True, seed=seed)
        set_loader_epoch(loader, epoch)
        return torch.cat([y for _, y in loader]), torch.cat([x.flatten(1)[:, 10] for x, _ in loader])

    a, b = order(0, 1), order(0, 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(order(0, 2)[1], a[1])
    assert not torch.equal(order(1, 1)[1], a[1])
    plain = make_loader(ds, 32, shuffle=False)
    assert torch.equal(torch.cat([y for _, y in plain]), ds.targets)
    assert len(plain) == 7


def test_offline_download_gives_one_clear_error_and_leaves_nothing(tmp_path):
    """A real download attempt (no internet here: torchvision fails with URLError)."""
    root = tmp_path / "data"
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("cifar10", split="train")
    err = info.value
    assert isinstance(err, FileNotFoundError)
    msg = str(err)
    assert "cifar10" in msg and str(root / "cifar10") in msg and "place" in msg
    assert "cifar-10-batches-py" in msg and "https://" in msg
    assert err.__cause__ is None and err.__suppress_context__  # raised "from None": no URLError chain
    assert not root.exists()  # no empty folders left behind


def test_missing_dataset_without_download_keeps_user_folder(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    with pytest.raises(DatasetUnavailableError, match="mnist") as info:
        load_dataset("mnist", split="test", root=user, download=False)
    assert str(user) in str(info.value) and "MNIST/raw" in str(info.value)
    assert user.exists() and list(user.iterdir()) == []


# fashionmnist is found offline (Debian's package): its message is tested in test_fashion_mnist.py
@pytest.mark.parametrize("name", [n for n in data.TORCHVISION_DATASETS if n != "fashionmnist"])
def test_every_downloadable_dataset_explains_where_to_put_it(name, tmp_path):
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset(name, split="train", download=False)
    msg = str(info.value)
    assert repr(name) in msg and str(tmp_path / "data" / name) in msg and "place" in msg
    assert not (tmp_path / "data").exists()


def test_imagenet_needs_a_folder(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="ImageFolder"):
        load_dataset("imagenet", split="train", root=tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()


def test_imagenet_folder_layout(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("n01", "n02"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(3):
                ramp = np.add.outer(np.arange(40), 4 * np.arange(48)) + 40 * i  # varies across the image
                Image.fromarray(np.repeat(ramp[:, :, None] % 256, 3, 2).astype(np.uint8)).save(d / f"{i}.JPEG")
    ds = load_dataset("imagenet", split="train", root=tmp_path, per_class=2, image_size=32)
    assert len(ds) == 4 and torch.bincount(ds.targets).tolist() == [2, 2]
    x, y = ds[0]
    assert x.shape == (3, 32, 32)
    loader = make_loader(ds, 3, shuffle=True, seed=0)
    xb, yb = next(iter(loader))
    assert xb.shape == (3, 3, 32, 32) and yb.shape == (3,)
    # ImageNet augmentation: random resized crops and flips, the same shape; off again for measurements
    aug = load_dataset("imagenet", split="train", root=tmp_path, per_class=2, image_size=32, augment=True)
    torch.manual_seed(0)
    a = torch.stack([aug[1][0] for _ in range(4)])
    assert a.shape == (4, 3, 32, 32) and not all(torch.equal(a[0], a[k]) for k in range(1, 4))
    plain = data.without_augmentation(aug)
    assert torch.equal(plain[1][0], ds[1][0]) and torch.equal(plain[1][0], plain[1][0])


def test_every_dataset_has_info():
    for name in DATASETS:
        info = dataset_info(name)
        assert info["num_classes"] >= 2 and len(info["input_shape"]) >= 1
    assert data.DATASET_INFO["stl10"]["input_shape"] == (3, 96, 96)
