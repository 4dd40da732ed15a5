"""The throughput options of a run (issue 16, sections 1-2): ``data_placement``, ``channels_last``, ``compile``
and the paper grids' bfloat16 default. What a CPU can check: the fields' validation and hashing, that each
option reaches the network and the loader, that a run with it gives the numbers of the plain run, and that
it resumes bit-identically. The GPU side (device-resident data on CUDA, float32 measurements of an AMP run,
an inductor-compiled body) is in tests/test_gpu.py."""
from __future__ import annotations

import json

import pytest
import torch

from nc_lib.config import (DATA_PLACEMENTS, HASHED_UNLESS_DEFAULT, TrainConfig, data_bytes, grid_amp, load_run_data,
                           place_run_data, prepare_for_training)
from nc_lib.data import ArrayDataset
from nc_lib.train import train

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _tmp_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("NC_DATA_DIR", str(tmp_path / "data"))


def _conv(**kw) -> TrainConfig:
    base = dict(dataset="fake", model="resnet18", width=0.0625, epochs=3, lr=0.05, batch_size=20, milestones=(2,),
                measure_epochs=(1, 3), augment=True, device="cpu", snapshot_per_class=1, eval_batch_size=40,
                dataset_kwargs={"image_size": (3, 16, 16), "size": 60})
    base.update(kw)
    return TrainConfig(**base)


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# Fields
# ----------------------------------------------------------------------------------------------
def test_options_enter_the_hash_only_when_they_change_the_run():
    base = _conv()
    assert base.replace(channels_last=False, compile=False).config_hash() == base.config_hash()
    assert base.replace(channels_last=True).config_hash() != base.config_hash()
    assert base.replace(compile=True).config_hash() != base.config_hash()
    # where the data is served from does not change a single number: same run directory
    for placement in DATA_PLACEMENTS:
        assert base.replace(data_placement=placement).config_hash() == base.config_hash()
    assert HASHED_UNLESS_DEFAULT["channels_last"] is False and HASHED_UNLESS_DEFAULT["compile"] is False


@pytest.mark.parametrize("field,value,words", [
    ("data_placement", "gpu", "data_placement"), ("channels_last", "yes", "channels_last"),
    ("compile", 1, "compile"), ("amp", "bf16", "amp")])
def test_bad_option_values_are_refused_with_the_choices(field, value, words):
    with pytest.raises(ValueError, match=words) as e:
        _conv(**{field: value})
    if field == "data_placement":
        assert all(p in str(e.value) for p in DATA_PLACEMENTS)
    else:
        assert "True or False" in str(e.value)


def test_paper_grids_train_in_bfloat16_unless_asked_and_the_other_scales_in_float32():
    from nc_lib.papers import markou2024, papyan2020, zhu2021

    def amps(g):
        return {c.amp for v in g.values() for c in (v.values() if isinstance(v, dict) else [v])}

    assert amps(papyan2020.grid("paper")) == {True} and amps(papyan2020.grid("paper", amp=False)) == {False}
    assert amps(zhu2021.grid("paper")) == {True} and amps(zhu2021.grid("paper", amp=False)) == {False}
    assert amps(markou2024.grid("paper")) == {True} and amps(markou2024.grid("paper", amp=False)) == {False}
    for scale in ("quick", "medium"):
        assert amps(papyan2020.grid(scale)) == amps(zhu2021.grid(scale)) == amps(markou2024.grid(scale)) == {False}
    assert grid_amp("medium", True) is True
    with pytest.raises(ValueError, match="amp"):
        grid_amp("paper", "yes")


# ----------------------------------------------------------------------------------------------
# Data placement
# ----------------------------------------------------------------------------------------------
def test_cpu_runs_serve_the_in_memory_arrays_where_they_are():
    cfg = _conv(data_placement="device")
    datasets = load_run_data(cfg)
    assert all(isinstance(d, ArrayDataset) for d in datasets)
    placed = place_run_data(cfg, datasets, torch.device("cpu"))
    assert all(p is d for p, d in zip(placed, datasets))
    raw = datasets[0].raw
    assert data_bytes(datasets[0]) == raw.numel() * raw.element_size() + 8 * len(datasets[0]) > 0


def test_device_placement_of_data_read_from_files_is_refused():
    class FromFiles(torch.utils.data.Dataset):  # what ImageNet's FolderDataset is to place_run_data
        def __len__(self):
            return 4

    cfg = _conv(data_placement="device")
    with pytest.raises(ValueError, match="data_placement='device'.*'auto' or 'host'"):
        place_run_data(cfg, (FromFiles(), FromFiles()), torch.device("cpu"))
    assert data_bytes(FromFiles()) == 0
    # "auto" and "host" keep such data where it is, on any device
    for placement in ("auto", "host"):
        got = place_run_data(cfg.replace(data_placement=placement), (d := FromFiles(),), torch.device("cpu"))
        assert got[0] is d


# ----------------------------------------------------------------------------------------------
# channels_last
# ----------------------------------------------------------------------------------------------
def test_channels_last_is_for_convolutions_on_cuda_and_ignored_with_a_warning_on_the_cpu():
    """NHWC only for a convolutional family on a CUDA device (tests/test_gpu.py trains one there). On the CPU the
    option is ignored with a warning: torch's NHWC CPU kernels aborted with heap corruption in backward on one
    thread and changed the numbers on two (see ``config.uses_channels_last``)."""
    from nc_lib.config import build_run_model, uses_channels_last

    cfg = _conv(channels_last=True)
    assert uses_channels_last(cfg, torch.device("cuda"))
    assert not uses_channels_last(_conv(), torch.device("cuda"))
    mlp_cfg = TrainConfig(dataset="digits", model="mlp", width=0.1, channels_last=True, device="cpu")
    assert not uses_channels_last(mlp_cfg, torch.device("cuda"))
    with pytest.warns(UserWarning, match="channels_last applies on CUDA only"):
        assert not uses_channels_last(cfg, torch.device("cpu"))
    with pytest.warns(UserWarning, match="CUDA only"):
        model = prepare_for_training(build_run_model(cfg, torch.device("cpu"), {"num_classes": 10, "input_shape": [3, 16, 16]}),
                                     cfg, torch.device("cpu"))
    assert all(p.is_contiguous() for p in model.parameters())  # NCHW on the CPU


def test_a_channels_last_run_on_the_cpu_is_the_plain_run_and_resumes_bit_identically(tmp_path, monkeypatch):
    plain = train(_conv(), progress=False)
    nhwc_cfg = _conv(channels_last=True)
    with pytest.warns(UserWarning, match="CUDA only"):
        nhwc = train(nhwc_cfg, progress=False)
    assert nhwc.path != plain.path  # its own run (the option is in the hash) with the plain run's numbers
    for a, b in zip(_records(plain), _records(nhwc), strict=True):
        assert a["epoch"] == b["epoch"]
        for k in ("train_loss", "within_class_variability", "test_accuracy", "self_duality"):
            assert b[k] == a[k], k
    # interrupted after epoch 2 (checkpoint at the measurement of epoch 1), resumed: the same file, byte for byte
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "resumed"))
    part = train(nhwc_cfg, progress=False, stop_after_epochs=2)
    assert not part.finished
    again = train(nhwc_cfg, progress=False)
    assert (again.path / "metrics.jsonl").read_bytes() == (nhwc.path / "metrics.jsonl").read_bytes()


# ----------------------------------------------------------------------------------------------
# compile
# ----------------------------------------------------------------------------------------------
def test_compile_compiles_the_body_and_keeps_the_checkpoints_loadable(monkeypatch):
    """The body goes through ``nn.Module.compile`` (in place: state_dict keys unchanged). Inductor's C++
    build takes a minute on a CPU, so here TorchDynamo traces the body for the eager backend, which runs the
    captured graphs as they are; tests/test_gpu.py compiles with inductor."""
    calls = []
    original = torch.nn.Module.compile

    def traced_eagerly(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return original(self, *args, backend="eager", **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", traced_eagerly)
    torch._dynamo.reset()
    cfg = _conv(compile=True, augment=False)
    run = train(cfg, progress=False)
    plain = train(_conv(augment=False), progress=False)
    assert len(calls) == 1
    for a, b in zip(_records(plain), _records(run), strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["within_class_variability"] == pytest.approx(a["within_class_variability"], rel=1e-3)
    model = run.model("cpu")  # a checkpoint of the compiled run loads into a plain network
    assert not any("_orig_mod" in k for k in model.state_dict())
