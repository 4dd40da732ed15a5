"""Fashion-MNIST offline (issue 12): the real loader on Debian's files (package dataset-fashion-mnist).

The files are found in <NC_DATA_DIR>/FashionMNIST/raw, in Debian's folder or in a folder the user names
(root= or NC_FASHION_MNIST_DIR), placed once (decompressed) into NC_DATA_DIR and read by torchvision's
FashionMNIST class; a truncated or corrupt file raises an error naming it.
"""
from __future__ import annotations

import gzip
import shutil

import pytest
import torch

from nc_lib import data
from nc_lib.data import CorruptDatasetFileError, DatasetUnavailableError, load_dataset, load_train_test

DEBIAN = data.FASHION_MNIST_DEBIAN_DIR
NAMES = tuple(data.FASHION_MNIST_FILES)
HAVE_DEBIAN = all((DEBIAN / (n + ".gz")).is_file() for n in NAMES)
needs_files = pytest.mark.skipif(
    not HAVE_DEBIAN, reason=f"Debian's Fashion-MNIST files are not in {DEBIAN} "
                            "(install them with: sudo apt-get install dataset-fashion-mnist)")


@pytest.fixture(autouse=True)
def _tmp_data_dir(tmp_path, monkeypatch):
    """An empty data folder per test, and no user folder from the environment."""
    monkeypatch.setenv("NC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv(data.FASHION_MNIST_ENV, raising=False)
    data._STATS_CACHE.clear()


@pytest.fixture(scope="module")
def placed(tmp_path_factory):
    """One data folder where the files are placed once, shared by the tests that only read them."""
    return tmp_path_factory.mktemp("fashion") / "data"


@pytest.fixture
def shared_data(placed, monkeypatch):
    monkeypatch.setenv("NC_DATA_DIR", str(placed))
    return placed


def _user_copy(folder, *, gz=True):
    """The four Debian files copied into ``folder`` (gzipped or decompressed)."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in NAMES:
        if gz:
            shutil.copy(DEBIAN / (n + ".gz"), folder / (n + ".gz"))
        else:
            (folder / n).write_bytes(gzip.decompress((DEBIAN / (n + ".gz")).read_bytes()))
    return folder


@needs_files
def test_full_splits_have_the_published_sizes_and_are_placed_once(shared_data):
    train = load_dataset("fashionmnist", split="train")
    test = load_dataset("fashionmnist", split="test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.raw.shape == (60000, 1, 28, 28) and train.raw.dtype == torch.uint8
    assert torch.bincount(train.targets, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(test.targets, minlength=10).tolist() == [1000] * 10
    assert train.num_classes == 10 and train.input_shape == (1, 28, 28)
    raw_dir = shared_data / "FashionMNIST" / "raw"
    sizes = {p.name: p.stat().st_size for p in raw_dir.iterdir()}
    assert sizes == {"train-images-idx3-ubyte": 16 + 60000 * 784, "train-labels-idx1-ubyte": 8 + 60000,
                     "t10k-images-idx3-ubyte": 16 + 10000 * 784, "t10k-labels-idx1-ubyte": 8 + 10000}
    mtimes = {p.name: p.stat().st_mtime_ns for p in raw_dir.iterdir()}
    data._read_fashion_cached.cache_clear()
    again = load_dataset("fashionmnist", split="train", per_class=3)
    assert {p.name: p.stat().st_mtime_ns for p in raw_dir.iterdir()} == mtimes  # not copied again
    assert len(again) == 30


@needs_files
def test_standardisation_uses_training_set_statistics(shared_data):
    train, test = load_train_test("fashionmnist", per_class=20, test_per_class=10)
    full = load_dataset("fashionmnist", split="train").raw.double() / 255.0
    mean, std = full.mean(0), full.std(0, unbiased=False)
    assert torch.allclose(train.mean.double(), mean, atol=1e-6)
    assert torch.allclose(train.std.double(), std, atol=1e-6)
    # the test split is standardised with the training statistics, not its own
    assert torch.equal(test.mean, train.mean) and torch.equal(test.std, train.std)
    x, y = test.get_batch([0, 5])
    assert torch.allclose(x, (test.raw[[0, 5]].float() / 255.0 - train.mean) / train.std)
    assert torch.equal(y, test.targets[[0, 5]])


@needs_files
@pytest.mark.parametrize("per_class,seed", [(1, 0), (37, 1), (6000, 2)])
def test_balanced_subsampling_gives_exact_counts(shared_data, per_class, seed):
    ds = load_dataset("fashionmnist", split="train", per_class=per_class, seed=seed)
    assert torch.bincount(ds.targets, minlength=10).tolist() == [per_class] * 10
    test = load_dataset("fashionmnist", split="test", per_class=min(per_class, 1000), seed=seed)
    assert torch.bincount(test.targets, minlength=10).tolist() == [min(per_class, 1000)] * 10
    with pytest.raises(ValueError, match="per_class=1001"):
        load_dataset("fashionmnist", split="test", per_class=1001)


@needs_files
@pytest.mark.parametrize("how", ["root", "env"])
def test_a_folder_the_user_names(tmp_path, monkeypatch, how):
    """A user folder with the .gz files is found first (Debian's folder patched away to prove it)."""
    user = _user_copy(tmp_path / "mine")
    monkeypatch.setattr(data, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "no-debian")
    if how == "env":
        monkeypatch.setenv(data.FASHION_MNIST_ENV, str(user))
    ds = load_dataset("fashionmnist", split="test", root=user if how == "root" else None, download=False)
    assert len(ds) == 10000
    assert (tmp_path / "data" / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()


@needs_files
def test_a_root_in_torchvision_layout_is_read_in_place(tmp_path):
    root = tmp_path / "tv"
    _user_copy(root / "FashionMNIST" / "raw", gz=False)
    ds = load_dataset("fashionmnist", split="test", root=root, download=False)
    assert len(ds) == 10000
    assert not (tmp_path / "data").exists()  # nothing placed: torchvision read the user's copy


@needs_files
@pytest.mark.parametrize("case", ["truncated_gz", "bad_gz", "wrong_magic", "wrong_count"])
def test_a_corrupt_source_file_is_named_and_nothing_is_placed(tmp_path, monkeypatch, case):
    user = _user_copy(tmp_path / "mine")
    monkeypatch.setattr(data, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "no-debian")
    name = "train-images-idx3-ubyte"
    bad = user / (name + ".gz")
    raw = bad.read_bytes()
    if case == "truncated_gz":  # a partly downloaded archive
        bad.write_bytes(raw[: len(raw) // 2])
    elif case == "bad_gz":
        bad.write_bytes(b"not a gzip file at all")
    elif case == "wrong_magic":  # a labels file under the images' name
        bad.write_bytes((user / "train-labels-idx1-ubyte.gz").read_bytes())
    else:  # a valid gzip of an IDX file with too few images
        full = gzip.decompress(raw)
        bad.write_bytes(gzip.compress(full[:16 + 784 * 1000]))
    with pytest.raises(CorruptDatasetFileError) as info:
        load_dataset("fashionmnist", split="train", root=user, download=False)
    assert str(bad) in str(info.value)
    assert isinstance(info.value, ValueError)
    assert not (tmp_path / "data" / "FashionMNIST" / "raw" / name).exists()


@needs_files
def test_a_partly_extracted_placed_file_is_named_never_read(tmp_path):
    """A truncated uncompressed file in data/FashionMNIST/raw raises, even though Debian's copy is good."""
    raw_dir = tmp_path / "data" / "FashionMNIST" / "raw"
    _user_copy(raw_dir, gz=False)
    part = raw_dir / "train-images-idx3-ubyte"
    part.write_bytes(part.read_bytes()[: 16 + 784 * 59999 + 100])  # one image short, mid-image
    data._read_fashion_cached.cache_clear()
    with pytest.raises(CorruptDatasetFileError, match="truncated") as info:
        load_dataset("fashionmnist", split="train")
    assert str(part) in str(info.value)
    assert part.stat().st_size == 16 + 784 * 59999 + 100  # left for the user to inspect, not overwritten


def test_missing_files_message_names_package_folders_and_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "no-debian")
    user = tmp_path / "mine"
    user.mkdir()
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("fashionmnist", split="train", root=user, download=False)
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    raw_dir = tmp_path / "data" / "FashionMNIST" / "raw"
    for folder in (user, raw_dir, tmp_path / "no-debian"):
        assert str(folder) in msg
    assert f"into {raw_dir}/" in msg and data.FASHION_MNIST_ENV in msg and "root=" in msg
    assert all(n in msg for n in NAMES)
    assert list(user.iterdir()) == [] and not (tmp_path / "data").exists()


def test_missing_files_offline_download_attempt_gives_the_same_message(tmp_path, monkeypatch):
    """download=True: torchvision's own download is tried (no internet here) and fails with the message."""
    monkeypatch.setattr(data, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "no-debian")
    try:
        with pytest.raises(DatasetUnavailableError) as info:
            load_dataset("fashionmnist", split="test", download=True)
    except pytest.fail.Exception:  # pragma: no cover - a machine with internet downloads it
        pytest.skip("this machine could download Fashion-MNIST")
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "download=False" not in msg
    assert info.value.__suppress_context__
    assert not (tmp_path / "data").exists()  # torchvision's empty folders removed
