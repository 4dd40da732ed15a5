"""Datasets for the terminal-phase experiments (Papyan, Han & Donoho 2020, section 3 of REFERENCE.md).

Every dataset is returned as a :class:`torch.utils.data.Dataset` of ``(x, y)`` pairs with a few extra
attributes that the models and the training engine read: ``name``, ``split``, ``num_classes``,
``input_shape`` (the shape of one ``x``), ``targets`` (a LongTensor of the labels actually served,
after subsampling and label randomisation) and ``mean`` / ``std`` (the standardisation statistics).

Sources
-------
- Downloaded by torchvision into ``data_dir()/<name>/``: ``mnist``, ``cifar10``, ``cifar100``, ``svhn``,
  ``stl10``. Offline, a missing dataset raises one :class:`DatasetUnavailableError` saying where to put
  the files.
- ``fashionmnist`` (Papyan's Fashion-MNIST; works offline): torchvision's ``FashionMNIST`` class reads
  the four uncompressed IDX files from ``data_dir()/FashionMNIST/raw/``. Where they are not there yet,
  they are placed there once (decompressed, checked, written atomically) from the first of: the folder
  the user names (``root=<folder>`` or ``$NC_FASHION_MNIST_DIR``; the files plain or ``.gz``, directly in
  it or in ``<folder>/FashionMNIST/raw/``), ``.gz`` copies in ``data_dir()/FashionMNIST/raw/``, Debian's
  package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``); failing all three,
  torchvision's own download. A ``root`` that already holds the uncompressed files in torchvision's
  layout is read in place. A truncated or corrupt file raises :class:`CorruptDatasetFileError` naming it.
- ``imagenet``: an ImageFolder tree ``<root>/train/<class>/*.JPEG`` and ``<root>/val/<class>/*``,
  where ``root`` is a folder the user names (default ``data_dir()/imagenet``).
- Offline and real: ``digits`` (scikit-learn, 1797 8x8 images, 1 channel; a fixed stratified split,
  30 images per class held out as the test set) and ``mnist1d`` (Greydanus' MNIST-1D, 4000 + 1000
  signals of length 40, served as ``(1, 40)`` one-channel signals).
- Synthetic: ``gaussian`` (an isotropic Gaussian mixture) and ``fake`` (torchvision FakeData images
  of any shape with balanced labels i mod C, for shape tests of paper-scale networks).

Preprocessing
-------------
- Per-pixel standardisation as in Papyan et al.: ``x <- (x - m) / s`` where ``m`` and ``s`` are the
  per-pixel (per-coordinate) mean and standard deviation over the *full training split* (pixels of
  zero deviation, e.g. MNIST borders, are only centred). ImageNet uses the usual per-channel
  statistics (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225), since a per-pixel pass over 1.2M
  images is out of reach.
- Class-balanced subsampling (``per_class``): exactly ``per_class`` samples of every class, chosen by
  a seeded permutation (Papyan: MNIST 5000/class, SVHN 4600/class, ImageNet 600/class).
- ``random_labels=True``: the labels are shuffled among the samples (a seeded permutation), so every
  class keeps its exact count while the label is independent of the input (Zhang et al.; Zhu et
  al. 2021's UFM-validity experiment).
- ``augment=True`` (images only): random crop with zero padding 4 and a random horizontal flip,
  drawn from torch's global RNG (which the training engine checkpoints).
"""
from __future__ import annotations

import gzip
import math
import os
import zlib
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .atomic_io import atomic_write_bytes
from .paths import data_dir
from .validation import check_choice, check_int, check_positive

TORCHVISION_DATASETS = ("mnist", "fashionmnist", "cifar10", "cifar100", "svhn", "stl10")
DATASETS = TORCHVISION_DATASETS + ("imagenet", "digits", "mnist1d", "gaussian", "fake")
SPLITS = ("train", "test")

#: number of classes and shape of one input, per dataset (``gaussian`` and ``fake`` take theirs from kwargs)
DATASET_INFO: dict[str, dict[str, Any]] = {
    "mnist": {"num_classes": 10, "input_shape": (1, 28, 28)},
    "fashionmnist": {"num_classes": 10, "input_shape": (1, 28, 28)},
    "cifar10": {"num_classes": 10, "input_shape": (3, 32, 32)},
    "cifar100": {"num_classes": 100, "input_shape": (3, 32, 32)},
    "svhn": {"num_classes": 10, "input_shape": (3, 32, 32)},
    "stl10": {"num_classes": 10, "input_shape": (3, 96, 96)},
    "imagenet": {"num_classes": 1000, "input_shape": (3, 224, 224)},
    "digits": {"num_classes": 10, "input_shape": (1, 8, 8)},
    "mnist1d": {"num_classes": 10, "input_shape": (1, 40)},
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_TEST_PER_CLASS = 30

_PLACEMENT = {
    "mnist": ("MNIST/raw/", "train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), "
              "t10k-images-idx3-ubyte(.gz), t10k-labels-idx1-ubyte(.gz)",
              "https://ossci-datasets.s3.amazonaws.com/mnist/"),
    "fashionmnist": ("FashionMNIST/raw/", "train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), "
                     "t10k-images-idx3-ubyte(.gz), t10k-labels-idx1-ubyte(.gz)",
                     "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
    "cifar10": ("", "the folder cifar-10-batches-py/ (unpacked from cifar-10-python.tar.gz)",
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ("", "the folder cifar-100-python/ (unpacked from cifar-100-python.tar.gz)",
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
    "svhn": ("", "train_32x32.mat and test_32x32.mat",
             "http://ufldl.stanford.edu/housenumbers/"),
    "stl10": ("", "the folder stl10_binary/ (unpacked from stl10_binary.tar.gz)",
              "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"),
}


class DatasetUnavailableError(FileNotFoundError):
    """A dataset is neither cached on disk nor downloadable: the message says where to put it."""


class CorruptDatasetFileError(ValueError):
    """A dataset file is truncated, partly extracted or not the file its name says: the message names it."""


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------
class ArrayDataset(Dataset):
    """An in-memory dataset: raw inputs (uint8 images or float arrays), labels, standardisation.

    ``x = (raw.float() / scale - mean) / std``, then (if ``augment``) random crop (padding 4) + flip.
    ``get_batch(indices)`` serves a whole batch at once (used by :func:`make_loader`).

    Device-resident: :meth:`to` (or ``device=``) moves the raw array (uint8 images stay uint8), the
    served labels and the standardisation to a device once; batches are then indexed, standardised
    and augmented there, batched, with no host-to-device copy of the data. ``targets`` stays on the
    CPU (the samplers and subsets read it); the augmentation's random draws come from torch's CPU
    generator on every device, so a seed gives the same crops and flips on CPU and GPU.
    """

    def __init__(self, raw: Tensor, targets: Tensor, *, num_classes: int, mean: Tensor, std: Tensor,
                 scale: float = 1.0, augment: bool = False, name: str = "", split: str = "train",
                 device: torch.device | str | None = None) -> None:
        self.raw = raw
        self.targets = targets.long().cpu()
        self.num_classes = int(num_classes)
        self.mean = mean.float()
        self.std = std.float()
        self.scale = float(scale)
        self.augment = bool(augment)
        self.name = name
        self.split = split
        self.input_shape = tuple(raw.shape[1:])
        if self.augment and len(self.input_shape) != 3:
            raise ValueError(f"augment=True needs image data (C x H x W); dataset {name!r} has "
                             f"inputs of shape {self.input_shape}.")
        self._served: tuple[Tensor, Tensor] = (self.targets, self.targets)  # (targets, their copy where raw is)
        if device is not None:
            self._move(torch.device(device))

    @property
    def device(self) -> torch.device:
        """Where the raw data lives and where batches are served."""
        return self.raw.device

    def _move(self, device: torch.device) -> None:
        self.raw = self.raw.to(device)
        self._served = (self.targets, self.targets.to(device))
        self.mean, self.std = self.mean.to(device), self.std.to(device)

    def _served_targets(self) -> Tensor:
        """``targets`` on the data's device, copied once (again only if ``targets`` is replaced)."""
        if self._served[0] is not self.targets:
            self._served = (self.targets, self.targets.to(self.raw.device))
        return self._served[1]

    def to(self, device: torch.device | str) -> "ArrayDataset":
        """The same dataset held on ``device`` (raw data, served labels, standardisation moved once); self
        if it is there already."""
        device = torch.device(device)
        if self.raw.device == device or (device.type == self.raw.device.type and device.index is None):
            return self
        return ArrayDataset(self.raw, self.targets, num_classes=self.num_classes, mean=self.mean, std=self.std,
                            scale=self.scale, augment=self.augment, name=self.name, split=self.split, device=device)

    def __len__(self) -> int:
        return len(self.targets)

    def _prepare(self, raw: Tensor) -> Tensor:
        x = raw.float()
        if self.scale != 1.0:
            x = x / self.scale
        x = (x - self.mean) / self.std
        if self.augment:
            x = random_crop_flip(x)
        return x

    def get_batch(self, indices: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.raw.device)
        return self._prepare(self.raw[idx]), self._served_targets()[idx]

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        return self.get_batch(indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x, y = self.get_batch([int(i)])
        return x[0], int(y[0])


class FolderDataset(Dataset):
    """A file-backed dataset (ImageNet's ImageFolder, images as PIL) with subsampling and label override.

    Images are resized to 256/224 of ``image_size`` and centre-cropped, or with ``augment=True`` (training)
    cropped at a random scale and aspect (RandomResizedCrop) and flipped at random, the usual ImageNet
    augmentation; randomness from torch's generator (seeded by the engine and in each loader worker)."""

    def __init__(self, base: Dataset, indices: Tensor, targets: Tensor, *, num_classes: int,
                 input_shape: tuple[int, ...], mean: Tensor, std: Tensor, name: str, split: str,
                 augment: bool = False) -> None:
        import torchvision.transforms as T

        size = input_shape[-1]
        crop = ([T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if augment else
                [T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size)])
        self.transform = T.Compose(crop + [T.ToTensor(), T.Normalize(mean.tolist(), std.tolist())])
        self.augment = augment
        self.base = base
        self.indices = indices.long()
        self.targets = targets.long()
        self.num_classes = num_classes
        self.input_shape = input_shape
        self.mean = mean
        self.std = std
        self.name = name
        self.split = split

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x, _ = self.base[int(self.indices[i])]
        return self.transform(x), int(self.targets[i])


def random_crop_flip(x: Tensor, padding: int = 4) -> Tensor:
    """Random crop of the zero-padded image (padding 4) and a random horizontal flip, per image.

    ``x`` is a batch B x C x H x W, on any device; randomness from torch's global CPU generator (offsets
    ``randint(0, 2 padding + 1, (B, 2))``, then flips ``rand(B) < 0.5``, the draws of the former per-image
    loop, so a seed gives the same batches as before and on every device). Batched: one gather with
    index arithmetic, out[b, :, i, j] = padded[b, :, dy_b + i, dx_b + (W-1-j if flip_b else j)]
    (about 4x faster than the loop on a CPU at batch 128).
    """
    B, C, H, W = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    Wp = W + 2 * padding
    offs = torch.randint(0, 2 * padding + 1, (B, 2)).to(x.device, non_blocking=True)
    flips = (torch.rand(B) < 0.5).to(x.device, non_blocking=True)
    ar_h, ar_w = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    rows = offs[:, 0, None] + ar_h  # B x H
    cols = offs[:, 1, None] + torch.where(flips[:, None], ar_w.flip(0), ar_w)  # B x W
    flat = (rows[:, :, None] * Wp + cols[:, None, :]).reshape(B, 1, H * W).expand(B, C, H * W)
    return padded.reshape(B, C, -1).gather(2, flat).reshape(B, C, H, W)


# ----------------------------------------------------------------------------------------------
# Subsampling and labels
# ----------------------------------------------------------------------------------------------
def balanced_indices(targets: Tensor | np.ndarray | Sequence[int], per_class: int | Sequence[int], seed: int = 0,
                     num_classes: int | None = None) -> Tensor:
    """Indices of exactly ``per_class`` samples of every class, chosen by a seeded permutation; with a
    sequence, ``per_class[c]`` samples of class c (an imbalanced subset, see :func:`imbalanced_counts`).

    Returned sorted (so the dataset keeps its original order). Raises ValueError if some class has
    fewer samples than asked for.
    """
    t = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    C = int(num_classes) if num_classes is not None else int(t.max()) + 1
    if isinstance(per_class, (int, np.integer)):
        counts = [check_int("per_class", per_class, 1)] * C
    else:
        counts = [check_int("per_class", k, 1) for k in per_class]
        if len(counts) != C:
            raise ValueError(f"per_class holds {len(counts)} counts but the dataset has {C} classes; give one per class.")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(t), generator=g)
    chosen = []
    for c in range(C):
        idx = perm[t[perm] == c]
        if len(idx) < counts[c]:
            raise ValueError(f"per_class={counts[c]} is too large: class {c} has only {len(idx)} samples "
                             f"(choose per_class <= {min(int((t == k).sum()) for k in range(C))}).")
        chosen.append(idx[:counts[c]])
    return torch.sort(torch.cat(chosen)).values


IMBALANCE_PROFILES = ("step", "exp")


def imbalanced_counts(n_max: int, num_classes: int, ratio: float, profile: str = "step") -> list[int]:
    """Per-class training counts of a long-tailed set with imbalance ratio rho = n_max / n_min.

    ``"step"`` (Buda et al. 2018; Cao et al. 2019; Fang et al. 2021's minority collapse): the first
    ceil(C/2) classes keep n_max samples, the others floor(n_max / rho). ``"exp"`` (Cui et al. 2019;
    Cao et al. 2019's long-tailed CIFAR): n_c = floor(n_max * rho^(-c/(C-1))), c = 0..C-1. At least 1 each.
    """
    n_max = check_int("per_class", n_max, 1)
    C = check_int("num_classes", num_classes, 2)
    ratio = check_positive("imbalance_ratio", ratio)
    if ratio < 1:
        raise ValueError(f"imbalance_ratio must be >= 1 (n_max / n_min), got {ratio}.")
    profile = check_choice("imbalance_profile", profile, IMBALANCE_PROFILES)
    if profile == "step":
        major = (C + 1) // 2
        return [n_max] * major + [max(1, int(n_max / ratio))] * (C - major)
    return [max(1, int(n_max * ratio ** (-c / (C - 1)))) for c in range(C)]


def shuffled_labels(targets: Tensor, seed: int) -> Tensor:
    """Labels permuted among samples by a seeded permutation (class counts unchanged)."""
    g = torch.Generator().manual_seed(int(seed) + 7919)
    return targets[torch.randperm(len(targets), generator=g)]


# ----------------------------------------------------------------------------------------------
# Raw sources: each returns (raw inputs, targets, scale) for a split
# ----------------------------------------------------------------------------------------------
def _dataset_root(name: str, root: str | os.PathLike | None) -> Path:
    return Path(root) if root is not None else data_dir() / name


def _existing_dirs(path: Path) -> set[Path]:
    if not path.exists():
        return set()
    return {p for p in [path, *path.rglob("*")] if p.is_dir()}


def _unavailable(name: str, folder: Path, reason: str) -> DatasetUnavailableError:
    sub, files, url = _PLACEMENT[name]
    return DatasetUnavailableError(
        f"Dataset {name!r} is not available: no usable copy in {folder} and it could not be "
        f"downloaded ({reason}). To use it offline, download {url} on a machine with internet "
        f"access and place {files} in {folder / sub if sub else folder}/ "
        f"(or pass root=<folder> / set NC_DATA_DIR)."
    )


def _torchvision_split(name: str, split: str, folder: Path, download: bool) -> Any:
    import torchvision.datasets as tvd

    if name == "mnist":
        return tvd.MNIST(folder, train=split == "train", download=download)
    if name == "fashionmnist":
        return tvd.FashionMNIST(folder, train=split == "train", download=download)
    if name == "cifar10":
        return tvd.CIFAR10(folder, train=split == "train", download=download)
    if name == "cifar100":
        return tvd.CIFAR100(folder, train=split == "train", download=download)
    if name == "svhn":
        return tvd.SVHN(folder, split=split, download=download)
    if name == "stl10":
        return tvd.STL10(folder, split=split, download=download)
    raise AssertionError(name)  # pragma: no cover


def _load_torchvision(name: str, split: str, folder: Path, download: bool,
                      unavailable: Any = None) -> tuple[Tensor, Tensor, float]:
    """Open (or download) a torchvision dataset; offline -> one DatasetUnavailableError, no leftovers.

    ``unavailable(reason)`` builds that error (default :func:`_unavailable` for ``folder``)."""
    # parents of folder that do not exist yet are created by torchvision too: remember the top one
    top = folder
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    before = _existing_dirs(folder)
    folder_existed = folder.exists()
    top_existed = top.exists()
    try:
        ds = _torchvision_split(name, split, folder, download)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; torchvision's "not found" is RuntimeError
        created = sorted(_existing_dirs(folder) - before, key=lambda p: len(p.parts), reverse=True)
        for d in created:
            shutil.rmtree(d, ignore_errors=True)
        if not folder_existed:
            shutil.rmtree(folder, ignore_errors=True)
        if not top_existed:
            shutil.rmtree(top, ignore_errors=True)
        reason = type(err).__name__ + (": " + str(err).splitlines()[0][:200] if str(err) else "")
        if not download:
            reason = "download=False"
        raise (unavailable(reason) if unavailable is not None else _unavailable(name, folder, reason)) from None
    if name in ("mnist", "fashionmnist"):
        raw = ds.data.unsqueeze(1).clone()
        targets = torch.as_tensor(ds.targets)
    elif name in ("cifar10", "cifar100"):
        raw = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        targets = torch.as_tensor(ds.targets)
    else:  # svhn, stl10: N x C x H x W
        raw = torch.from_numpy(np.ascontiguousarray(ds.data))
        targets = torch.as_tensor(np.asarray(ds.labels))
    return raw, targets.long(), 255.0


# Fashion-MNIST: placed once from the user's folder, a hand-placed .gz or Debian's package, read by torchvision
#: where Debian's package ``dataset-fashion-mnist`` installs the four gzipped IDX files
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
#: environment variable naming a folder that holds the four IDX files (same as ``root=``)
FASHION_MNIST_ENV = "NC_FASHION_MNIST_DIR"
#: the four IDX files: name -> (magic number, shape); magic 2051 = uint8 3-d array, 2049 = uint8 1-d array
FASHION_MNIST_FILES: dict[str, tuple[int, tuple[int, ...]]] = {
    "train-images-idx3-ubyte": (2051, (60000, 28, 28)),
    "train-labels-idx1-ubyte": (2049, (60000,)),
    "t10k-images-idx3-ubyte": (2051, (10000, 28, 28)),
    "t10k-labels-idx1-ubyte": (2049, (10000,)),
}


def _fashion_raw_dir(root: Path) -> Path:
    """torchvision's folder for Fashion-MNIST under ``root``: ``<root>/FashionMNIST/raw``."""
    return Path(root) / "FashionMNIST" / "raw"


def _check_idx(head: bytes, size: int, name: str, path: Path) -> None:
    """Raise :class:`CorruptDatasetFileError` (naming ``path``) unless a file of ``size`` bytes starting with
    ``head`` is the complete IDX file ``name``: its magic number, its shape and ``header + prod(shape)`` bytes."""
    magic, shape = FASHION_MNIST_FILES[name]
    header = 4 * (1 + len(shape))
    hint = "; delete it and place the original file again (Debian: 'apt-get install --reinstall dataset-fashion-mnist')"
    if size < header:
        raise CorruptDatasetFileError(f"Fashion-MNIST file {path} is truncated: {size} bytes, shorter than its "
                                      f"{header}-byte IDX header{hint}.")
    got = [int.from_bytes(head[i:i + 4], "big") for i in range(0, header, 4)]
    if got[0] != magic or tuple(got[1:]) != shape:
        raise CorruptDatasetFileError(f"Fashion-MNIST file {path} is not {name}: IDX magic {got[0]} and shape "
                                      f"{tuple(got[1:])}, expected magic {magic} and shape {shape}{hint}.")
    expected = header + math.prod(shape)
    if size != expected:
        raise CorruptDatasetFileError(f"Fashion-MNIST file {path} is {'truncated' if size < expected else 'too long'}: "
                                      f"{size} bytes, expected {expected} for shape {shape}{hint}.")


def _read_idx_source(path: Path, name: str) -> bytes:
    """The checked, uncompressed bytes of IDX file ``name`` at ``path`` (a ``.gz`` is decompressed)."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as err:  # truncated: EOFError; bad magic or CRC: BadGzipFile
            raise CorruptDatasetFileError(f"Fashion-MNIST file {path} is not a complete gzip file ({err}); "
                                          f"delete it and place the original file again.") from None
    _check_idx(data[:16], len(data), name, path)
    return data


def _placed_complete(raw_dir: Path) -> bool:
    """Whether ``raw_dir`` holds the four uncompressed IDX files; each one present must pass :func:`_check_idx`
    (header and size), so a partly extracted file raises instead of being read."""
    complete = True
    for name in FASHION_MNIST_FILES:
        path = raw_dir / name
        if not path.is_file():
            complete = False
            continue
        with open(path, "rb") as f:
            head = f.read(16)
        _check_idx(head, path.stat().st_size, name, path)
    return complete


def _fashion_sources(root: Any) -> list[Path]:
    """The folders searched for the IDX files, in order: the user's (``root`` or ``$NC_FASHION_MNIST_DIR``,
    itself and its ``FashionMNIST/raw``), ``data_dir()/FashionMNIST/raw`` and Debian's folder."""
    user = root if root is not None else os.environ.get(FASHION_MNIST_ENV) or None
    folders = [Path(user), _fashion_raw_dir(Path(user))] if user is not None else []
    return folders + [_fashion_raw_dir(data_dir()), FASHION_MNIST_DEBIAN_DIR]


def _fashion_root(root: Any) -> Path | None:
    """The torchvision root whose ``FashionMNIST/raw`` holds the four checked, uncompressed files, placing
    them into ``data_dir()`` once (decompressed, atomically) from the first folder that has all four
    (plain or ``.gz``); None where no folder has them."""
    if root is not None and _placed_complete(_fashion_raw_dir(Path(root))):
        return Path(root)  # the user's folder in torchvision's layout: read in place
    target = _fashion_raw_dir(data_dir())
    if _placed_complete(target):
        return data_dir()
    for folder in _fashion_sources(root):
        found = {}
        for name in FASHION_MNIST_FILES:
            plain, gz = folder / name, folder / (name + ".gz")
            found[name] = plain if plain.is_file() else gz if gz.is_file() else None
        if all(found.values()):
            for name, src in found.items():
                if (target / name).is_file():
                    continue  # already placed (and checked by _placed_complete)
                atomic_write_bytes(target / name, _read_idx_source(src, name))
            return data_dir()
    return None


def _fashion_unavailable(root: Any, reason: str) -> DatasetUnavailableError:
    folders = ", ".join(str(f) for f in _fashion_sources(root))
    names = ", ".join(FASHION_MNIST_FILES)
    return DatasetUnavailableError(
        f"Dataset 'fashionmnist' is not available: none of {folders} holds the four IDX files ({names}; "
        f"plain or .gz) and they could not be downloaded ({reason}). Offline, install Debian's package "
        f"(sudo apt-get install dataset-fashion-mnist, which puts them in {FASHION_MNIST_DEBIAN_DIR}/), or "
        f"copy the four files (from {_PLACEMENT['fashionmnist'][2]}) into {_fashion_raw_dir(data_dir())}/, "
        f"or name their folder with root=<folder> or {FASHION_MNIST_ENV}=<folder>.")


@lru_cache(maxsize=4)
def _read_fashion_cached(root: str, split: str, stamp: tuple) -> tuple[Tensor, Tensor]:
    """Images (N x 1 x 28 x 28 uint8) and labels of one split, read by torchvision's ``FashionMNIST``;
    ``stamp`` (the files' size and mtime) makes a replaced file be read again."""
    import torchvision.datasets as tvd

    ds = tvd.FashionMNIST(root, train=split == "train", download=False)
    targets = torch.as_tensor(ds.targets).long()
    if targets.min() < 0 or targets.max() >= 10:
        raise CorruptDatasetFileError(f"Fashion-MNIST labels in {_fashion_raw_dir(Path(root))} lie outside 0..9.")
    return ds.data.unsqueeze(1).clone(), targets


def _load_fashionmnist(split: str, root: Any, download: bool) -> tuple[Tensor, Tensor, float]:
    """One split of Fashion-MNIST from the first folder that has it (see the module docstring)."""
    folder = _fashion_root(root)
    if folder is None:
        if not download:
            raise _fashion_unavailable(root, "download=False")
        _load_torchvision("fashionmnist", split, data_dir(), True, lambda reason: _fashion_unavailable(root, reason))
        folder = data_dir()
        if not _placed_complete(_fashion_raw_dir(folder)):  # pragma: no cover - torchvision checks its md5s
            raise _fashion_unavailable(root, "the download is incomplete")
    prefix = "train" if split == "train" else "t10k"
    files = [_fashion_raw_dir(folder) / f"{prefix}-{kind}-idx{d}-ubyte" for kind, d in (("images", 3), ("labels", 1))]
    stamp = tuple((f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    raw, targets = _read_fashion_cached(str(folder.resolve()), split, stamp)
    return raw, targets, 255.0


@lru_cache(maxsize=2)
def _digits_split() -> dict[str, tuple[Tensor, Tensor]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)  # N x 1 x 8 x 8, values 0..16
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    test = torch.cat([perm[y[perm] == c][:DIGITS_TEST_PER_CLASS] for c in range(10)])
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[test] = False
    train = torch.nonzero(mask).squeeze(1)
    test = torch.sort(test).values
    return {"train": (x[train], y[train]), "test": (x[test], y[test])}


@lru_cache(maxsize=2)
def _mnist1d_split() -> dict[str, tuple[Tensor, Tensor]]:
    import random

    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset reseeds Python's and numpy's global RNGs: restore them afterwards
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {
        "train": (torch.tensor(d["x"], dtype=torch.float32).unsqueeze(1), torch.tensor(d["y"], dtype=torch.long)),
        "test": (torch.tensor(d["x_test"], dtype=torch.float32).unsqueeze(1), torch.tensor(d["y_test"], dtype=torch.long)),
    }


def _gaussian_split(split: str, seed: int, num_classes: int, dim: int, n_per_class: int,
                    separation: float, noise: float) -> tuple[Tensor, Tensor]:
    """Isotropic Gaussian mixture: class means ~ N(0, separation^2/dim I) (seed), samples mean + noise N(0, noise^2 I)."""
    g = torch.Generator().manual_seed(int(seed))
    means = torch.randn(num_classes, dim, generator=g) * separation / math.sqrt(dim)
    g.manual_seed(int(seed) * 2 + (1 if split == "train" else 2) + 10_000)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = means[y] + noise * torch.randn(len(y), dim, generator=g)
    return x, y


def _fake_split(split: str, seed: int, num_classes: int, image_size: tuple[int, ...], size: int) -> tuple[Tensor, Tensor]:
    """torchvision FakeData images (uniform random) as uint8 tensors, with balanced labels
    ``i mod num_classes`` (FakeData's own labels are random, so a small set could miss a class)."""
    import torchvision.datasets as tvd
    from torchvision.transforms import PILToTensor

    ds = tvd.FakeData(size=size, image_size=tuple(image_size), num_classes=num_classes,
                      transform=PILToTensor(), random_offset=int(seed) * 2 + (0 if split == "train" else 1))
    xs = [ds[i][0] for i in range(size)]
    return torch.stack(xs), torch.arange(size, dtype=torch.long) % num_classes


def _raw_split(name: str, split: str, root: Any, download: bool, seed: int,
               kw: dict[str, Any]) -> tuple[Tensor, Tensor, float, int]:
    """(raw inputs, targets, scale, num_classes) of one split of a non-folder dataset."""
    if name == "fashionmnist":
        raw, y, scale = _load_fashionmnist(split, root, download)
        return raw, y, scale, 10
    if name in TORCHVISION_DATASETS:
        raw, y, scale = _load_torchvision(name, split, _dataset_root(name, root), download)
        return raw, y, scale, DATASET_INFO[name]["num_classes"]
    if name == "digits":
        x, y = _digits_split()[split]
        return x, y, 16.0, 10
    if name == "mnist1d":
        x, y = _mnist1d_split()[split]
        return x, y, 1.0, 10
    if name == "gaussian":
        C = check_int("num_classes", kw.get("num_classes", 10), 2)
        x, y = _gaussian_split(split, kw.get("data_seed", 0), C, check_int("dim", kw.get("dim", 32), 1),
                               check_int("n_per_class", kw.get("n_per_class", 100), 1),
                               check_positive("separation", kw.get("separation", 4.0)),
                               check_positive("noise", kw.get("noise", 1.0)))
        return x, y, 1.0, C
    if name == "fake":
        C = check_int("num_classes", kw.get("num_classes", 10), 2)
        shape = tuple(kw.get("image_size", (3, 32, 32)))
        size = check_int("size", kw.get("size", 64 if split == "train" else 32), 1)
        x, y = _fake_split(split, kw.get("data_seed", 0), C, shape, size)
        return x, y, 255.0, C
    raise AssertionError(name)  # pragma: no cover


_STATS_CACHE: dict[tuple, tuple[Tensor, Tensor]] = {}


def _train_stats(name: str, root: Any, download: bool, kw: dict[str, Any],
                 train: tuple[Tensor, float] | None = None) -> tuple[Tensor, Tensor]:
    """Per-pixel mean and std of the full training split (Papyan's standardisation)."""
    key = (name, str(root), tuple(sorted((k, str(v)) for k, v in kw.items())))
    if key not in _STATS_CACHE:
        if train is None:
            raw, _, scale, _ = _raw_split(name, "train", root, download, 0, kw)
        else:
            raw, scale = train
        mean = torch.zeros(raw.shape[1:], dtype=torch.float64)
        sq = torch.zeros(raw.shape[1:], dtype=torch.float64)
        for start in range(0, len(raw), 4096):  # chunks: never a float64 copy of the whole set
            chunk = raw[start:start + 4096].double() / scale
            mean += chunk.sum(0)
            sq += (chunk * chunk).sum(0)
        n = len(raw)
        mean /= n
        var = (sq / n - mean * mean).clamp(min=0)
        std = var.sqrt()
        std = torch.where(std > 1e-8, std, torch.ones_like(std))
        _STATS_CACHE[key] = (mean.float(), std.float())
    return _STATS_CACHE[key]


def _load_imagenet(split: str, root: Any) -> tuple[Dataset, Tensor]:
    import torchvision.datasets as tvd

    folder = Path(root) if root is not None else data_dir() / "imagenet"
    sub = folder / ("train" if split == "train" else "val")
    if not sub.is_dir():
        raise DatasetUnavailableError(
            f"Dataset 'imagenet' is not available: no folder {sub}. ImageNet cannot be downloaded "
            f"automatically; place the ILSVRC2012 images in ImageFolder layout, {folder}/train/<wnid>/*.JPEG "
            f"and {folder}/val/<wnid>/*.JPEG (validation images sorted into class folders), and pass "
            f"root={folder} (or set NC_DATA_DIR so that <NC_DATA_DIR>/imagenet holds them).")
    base = tvd.ImageFolder(str(sub))  # PIL images: FolderDataset crops and normalises them
    return base, torch.as_tensor(base.targets, dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------
def load_dataset(name: str, *, split: str, root: str | os.PathLike | None = None, per_class: int | None = None,
                 seed: int = 0, augment: bool = False, random_labels: bool = False, download: bool = True,
                 **kwargs: Any) -> Dataset:
    """One split of a dataset, standardised per pixel with training-set statistics.

    Parameters
    ----------
    name: one of :data:`DATASETS`.
    split: ``"train"`` or ``"test"``.
    root: folder holding the files (default ``data_dir()/<name>``).
    per_class: exact number of samples per class (seeded choice); ``None`` keeps all.
    seed: seed of the subsample and of the label shuffle.
    augment: random crop (padding 4) + horizontal flip, images only (ImageNet: RandomResizedCrop + flip).
    random_labels: shuffle the labels among the samples (class counts unchanged).
    download: let torchvision download a missing dataset.
    kwargs: ``gaussian``: ``num_classes`` (10), ``dim`` (32), ``n_per_class`` (100), ``separation`` (4.0),
        ``noise`` (1.0), ``data_seed`` (0, fixes the mixture); ``fake``: ``num_classes`` (10),
        ``image_size`` ((3, 32, 32)), ``size`` (64 train / 32 test), ``data_seed``; ``imagenet``:
        ``image_size`` (224).
    """
    name = check_choice("name", str(name).lower(), DATASETS)
    split = check_choice("split", split, SPLITS)
    seed = check_int("seed", seed)
    allowed = {"gaussian": {"num_classes", "dim", "n_per_class", "separation", "noise", "data_seed"},
               "fake": {"num_classes", "image_size", "size", "data_seed"},
               "imagenet": {"image_size"}}.get(name, set())
    for k in kwargs:
        if k not in allowed:
            raise ValueError(f"unknown option {k!r} for dataset {name!r}; valid options: {sorted(allowed)}.")
    if name == "imagenet":
        base, targets = _load_imagenet(split, root)
        check_int("image_size", kwargs.get("image_size", 224), 8)
        idx = (balanced_indices(targets, per_class, seed, len(base.classes)) if per_class is not None
               else torch.arange(len(targets)))
        t = targets[idx]
        if random_labels:
            t = shuffled_labels(t, seed)
        size = int(kwargs.get("image_size", 224))
        return FolderDataset(base, idx, t, num_classes=len(base.classes), input_shape=(3, size, size),
                             mean=torch.tensor(IMAGENET_MEAN), std=torch.tensor(IMAGENET_STD), name=name, split=split,
                             augment=augment)

    raw, targets, scale, C = _raw_split(name, split, root, download, seed, kwargs)
    stats_kw = {k: v for k, v in kwargs.items() if k != "size"}
    mean, std = _train_stats(name, root, download, stats_kw, (raw, scale) if split == "train" and name != "fake" else None)
    if per_class is not None:
        idx = balanced_indices(targets, per_class, seed, C)
        raw, targets = raw[idx], targets[idx]
    if random_labels:
        targets = shuffled_labels(targets, seed)
    return ArrayDataset(raw, targets, num_classes=C, mean=mean, std=std, scale=scale, augment=augment,
                        name=name, split=split)


def load_train_test(name: str, *, root: str | os.PathLike | None = None, per_class: int | None = None,
                    test_per_class: int | None = None, seed: int = 0, augment: bool = False,
                    random_labels: bool = False, download: bool = True, **kwargs: Any) -> tuple[Dataset, Dataset]:
    """``(train, test)``: augmentation and random labels on the training split only."""
    train = load_dataset(name, split="train", root=root, per_class=per_class, seed=seed, augment=augment,
                         random_labels=random_labels, download=download, **kwargs)
    test = load_dataset(name, split="test", root=root, per_class=test_per_class, seed=seed, augment=False,
                        random_labels=False, download=download, **kwargs)
    return train, test


def dataset_info(name: str, **kwargs: Any) -> dict[str, Any]:
    """``{"num_classes", "input_shape"}`` of a dataset without loading it."""
    name = check_choice("name", str(name).lower(), DATASETS)
    if name == "gaussian":
        return {"num_classes": int(kwargs.get("num_classes", 10)), "input_shape": (int(kwargs.get("dim", 32)),)}
    if name == "fake":
        return {"num_classes": int(kwargs.get("num_classes", 10)), "input_shape": tuple(kwargs.get("image_size", (3, 32, 32)))}
    if name == "imagenet" and "image_size" in kwargs:
        s = int(kwargs["image_size"])
        return {"num_classes": 1000, "input_shape": (3, s, s)}
    return dict(DATASET_INFO[name])


def without_augmentation(dataset: Dataset) -> Dataset:
    """The same samples, labels and standardisation with augmentation switched off (for measurements)."""
    if isinstance(dataset, ArrayDataset) and dataset.augment:
        out = ArrayDataset(dataset.raw, dataset.targets, num_classes=dataset.num_classes, mean=dataset.mean,
                           std=dataset.std, scale=dataset.scale, augment=False, name=dataset.name, split=dataset.split)
        out._served = dataset._served  # a device-resident dataset stays there, its labels' copy shared
        return out
    if isinstance(dataset, FolderDataset) and dataset.augment:
        return FolderDataset(dataset.base, dataset.indices, dataset.targets, num_classes=dataset.num_classes,
                             input_shape=dataset.input_shape, mean=dataset.mean, std=dataset.std, name=dataset.name,
                             split=dataset.split, augment=False)
    return dataset


# ----------------------------------------------------------------------------------------------
# Loaders with a deterministic order per (seed, epoch)
# ----------------------------------------------------------------------------------------------
def epoch_order(n: int, shuffle: bool, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch, a function of (seed, epoch) only: every sampler of the kit (single
    process or one slice per rank under torchrun) walks this same order."""
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of indices; with ``shuffle`` the order of epoch e is ``randperm(n, seed=hash(seed, e))``.

    The order depends only on (seed, epoch), never on what ran before, so a resumed run sees the
    same batches as an uninterrupted one. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False) -> None:
        self.n = n
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.n, self.shuffle, self.seed, self.epoch)
        for start in range(0, self.n, self.batch_size):
            batch = order[start:start + self.batch_size]
            if self.drop_last and len(batch) < self.batch_size:
                return
            yield batch

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)


class StratifiedBatchSampler(Sampler[list[int]]):
    """Batches of indices with every class in every batch (when C <= batch_size), for the implicit
    ETF head, whose class means need every class (Markou's authors sample class-balanced batches).

    Per epoch (a generator seeded from ``(seed, epoch)``: deterministic per seed), with
    n_b = ceil(N/batch_size) batches:
    * C <= batch_size: each class is shuffled; its first n_b samples go one to each batch (a class
      with fewer than n_b samples is cycled, i.e. oversampled, so that it still reaches every
      batch); the remaining samples are shuffled and spread evenly over the batches. Batches then
      hold about N/n_b <= batch_size samples (more only when a class was oversampled). Each sample
      appears once per epoch otherwise.
    * C > batch_size: the classes cannot all fit; samples are interleaved (class c's k-th shuffled
      sample at position (k + u_c)/n_c, u_c uniform) and cut into batches of batch_size, so each
      batch has distinct classes as far as possible.
    Iterating advances the epoch; :meth:`set_epoch` sets it. Yields lists of int indices.
    """

    def __init__(self, labels: Sequence[int] | Tensor, batch_size: int, seed: int = 0) -> None:
        labels = torch.as_tensor(labels).long().reshape(-1)
        if labels.numel() == 0:
            raise ValueError("labels must not be empty.")
        if int(labels.min()) < 0:
            raise ValueError(f"labels must be >= 0; got min {int(labels.min())}.")
        self.labels = labels
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.seed = check_int("seed", seed)
        classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        self.classes, self._cls, self._counts = classes, inverse, counts
        self.num_batches = math.ceil(labels.numel() / self.batch_size)
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = check_int("epoch", epoch, 0)

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def batches(self) -> list[list[int]]:
        """The batches of the current epoch (without advancing it)."""
        g = self._generator()
        N, C, nb = self.labels.numel(), self.classes.numel(), self.num_batches
        perm = torch.randperm(N, generator=g)
        cls_perm = self._cls[perm]
        order = torch.argsort(cls_perm, stable=True)
        idx = perm[order]  # grouped by class, shuffled within each class
        cls = cls_perm[order]
        starts = torch.cumsum(self._counts, 0) - self._counts
        rank = torch.arange(N) - starts[cls]
        if C > self.batch_size:
            u = torch.rand(C, generator=g, dtype=torch.float64)
            key = (rank.double() + u[cls]) / self._counts[cls].double()
            flat = idx[torch.argsort(key, stable=True)]
            return [b.tolist() for b in torch.split(flat, self.batch_size)]
        slot = torch.arange(nb)
        reserved = idx[starts[:, None] + slot[None, :] % self._counts[:, None]]  # C x nb, one per class per batch
        reserved_batch = slot.expand(C, nb)
        pool = idx[rank >= nb]
        pool = pool[torch.randperm(pool.numel(), generator=g)]
        pool_batch = torch.arange(pool.numel()) * nb // max(pool.numel(), 1)
        all_idx = torch.cat([reserved.reshape(-1), pool])
        all_batch = torch.cat([reserved_batch.reshape(-1), pool_batch])
        key = all_batch.double() + torch.rand(all_idx.numel(), generator=g, dtype=torch.float64)
        o = torch.argsort(key)
        sizes = torch.bincount(all_batch, minlength=nb).tolist()
        return [b.tolist() for b in torch.split(all_idx[o], sizes)]

    def __iter__(self) -> Iterator[list[int]]:
        out = self.batches()
        self.epoch += 1
        return iter(out)


def _batch_identity(batch: Any) -> Any:
    return batch


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, *,
                drop_last: bool = False, num_workers: int = 0, pin_memory: bool = False,
                stratified: bool = False) -> DataLoader:
    """A DataLoader whose order is fixed by ``(seed, epoch)`` (see :class:`EpochBatchSampler`).

    ``stratified=True``: batches of :class:`StratifiedBatchSampler` on
    ``dataset.targets`` (every class in every batch when num_classes <= batch_size, sizes balanced
    at about N/ceil(N/batch_size); ``shuffle`` is implied and ``drop_last`` not supported), also a
    function of ``(seed, epoch)`` only. In-memory datasets (:class:`ArrayDataset`) are served a whole
    batch per fetch. Use ``loader.batch_sampler.set_epoch(e)`` (or :func:`set_loader_epoch`) to move
    to epoch ``e``.
    """
    if stratified:
        if drop_last:
            raise ValueError("drop_last=True is not supported with stratified=True (stratified batches have "
                             "balanced sizes); use drop_last=False.")
        targets = getattr(dataset, "targets", None)
        if targets is None:
            raise ValueError("stratified=True needs a dataset with a `targets` attribute (the labels).")
        sampler: Sampler = StratifiedBatchSampler(torch.as_tensor(targets), batch_size, seed=int(seed))
    else:
        sampler = EpochBatchSampler(len(dataset), batch_size, shuffle, seed, drop_last)
    collate = _batch_identity if isinstance(dataset, ArrayDataset) else None
    if isinstance(dataset, ArrayDataset) and dataset.device.type != "cpu":
        num_workers, pin_memory = 0, False  # device-resident: batches are indexed where they live
    kwargs: dict[str, Any] = {"batch_sampler": sampler, "num_workers": num_workers, "pin_memory": pin_memory}
    if collate is not None:
        kwargs["collate_fn"] = collate
    return DataLoader(dataset, **kwargs)


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Fix the shuffling order of ``loader`` (an :class:`EpochBatchSampler` or a stratified one) to
    that of ``epoch``."""
    bs = getattr(loader, "batch_sampler", None)
    if isinstance(bs, (EpochBatchSampler, StratifiedBatchSampler)):
        bs.set_epoch(epoch)
